"""results.json files → one table (mean ± std, n, 95% CI, gain over scratch) + CSV + plots.

``python -m transfer_lab.report <dir> [--out DIR] [--no-plots]`` (console script
``transfer-lab-report``). Runs are grouped by everything that varies across the directory except
the seed: the config-group choices (strategy, models, data, ...) and any resolved config value
(e.g. ``target.data.samples_per_class``, the label budget). Failed runs (``status != ok``) and job
directories without a results.json are listed, never dropped silently.

The headline metric is ``metrics["test/acc"]``, or ``metrics["test/r2"]`` (higher is better) for a
regression run, which has no ``test/acc``: columns ``r2_mean``, ``r2_std``, ``source_r2``, ...,
plots ``r2_vs_budget.png``, ``r2_bars_budget_<b>.png``. A directory mixing both gets one table per
metric, classification first; the regression table's files then end in ``_r2``
(``report_r2.csv``). What newer runs record adds columns and sections only when some result has it:
``metrics["test/balanced_acc"]`` (``balanced_acc_mean/std``), ``metrics["test/rmse"]``
(``rmse_mean``), ``transferability.{logme,leep}`` (means ``logme``, ``leep``), and
``per_class["test/acc"]`` labelled by ``data.target.classes`` (a per-class table, ``per_class.csv``).
Where ≥ 3 sources with transferability scores share every other key (strategy, budget, target...),
a "Transferability ranking" section (``ranking.csv``) lists each source's mean LogME, LEEP and
headline metric, and Kendall's τ of each score against that metric over the sources. A source is
what varies in ``source.*`` (model, data, classes, epochs, checkpoint), not ``source.key``: that
hash covers the seed too.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from transfer_lab.analysis.ranking import kendall_tau
from transfer_lab.io import atomic_write_text
from transfer_lab.report_render import (BUDGET, SCORES, markdown, per_class_markdown, plots,
                                        problems_markdown, ranking_markdown)

# never grouping keys: the seed is what we average over; where sources are kept changes nothing
IGNORED = {"seed", "store_dir", "data_dir"}
# headline metrics in table order: the first a run has is its metric
METRICS = ("acc", "r2")
# two-sided 95% Student t quantiles, df = 1..30 (beyond: the normal 1.96)
T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
       2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
       2.052, 2.048, 2.045, 2.042]


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b.c": value}``; lists stay values (as compact JSON, hashable)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    return {key: json.dumps(obj) if isinstance(obj, list) else obj}


def choice_column(group: str) -> str:
    """``model@source.model`` → ``source.model``: a choice is named by where it lands."""
    return group.split("@", 1)[-1]


def collect(root: Path) -> tuple[pd.DataFrame, list[dict]]:
    """One row per finished run; a list of failed/incomplete cells (path, status, error)."""
    rows, problems, seen = [], [], set()
    for path in sorted(root.rglob("results.json")):
        if "report" in path.relative_to(root).parts[:-1]:
            continue
        seen.add(path.parent)
        try:
            res = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append({"path": str(path.parent), "status": "unreadable", "error": str(e)})
            continue
        metric = headline(res.get("metrics") or {})
        if res.get("status") != "ok" or metric is None:
            problems.append({"path": str(path.parent), "status": res.get("status", "?"),
                             "error": res.get("error", "no test/acc or test/r2")})
            continue
        rows.append(row_of(res, path.parent))
    for hydra_dir in sorted(root.rglob(".hydra")):
        job = hydra_dir.parent
        if job not in seen and "report" not in job.relative_to(root).parts:
            problems.append({"path": str(job), "status": "incomplete", "error": "no results.json"})
    return pd.DataFrame(rows), problems


def row_of(res: dict, path: Path) -> dict[str, Any]:
    """Keys (``k:`` prefix) are the choices and the resolved config; values are measurements."""
    # null → "null" so that a null value (e.g. budget: all labels) differs from a key this
    # results.json does not have at all (an older config schema), which stays NaN
    row = {f"k:{k}": "null" if v is None else v for k, v in flatten(res.get("config") or {}).items()
           if k.split(".")[0] not in IGNORED}
    for group, value in (res.get("choices") or {}).items():
        row[f"k:{choice_column(group)}"] = "null" if value is None else value
    row["k:strategy"] = res.get("strategy")
    src, timings, params = res.get("source") or {}, res.get("timings") or {}, res.get("params") or {}
    m, metrics = headline(res["metrics"]), res["metrics"]
    row.update({"seed": res.get("seed"), "metric": m, m: metrics[f"test/{m}"], "path": str(path),
                f"source_{m}": src.get(f"test/{m}"), "trainable": params.get("trainable"),
                "total_params": params.get("total"), "time_s": timings.get("total_s")})
    row.update({c: metrics.get(f"test/{c}") for c in ("balanced_acc", "rmse")})
    row.update({c: (res.get("transferability") or {}).get(c) for c in SCORES})
    row["per_class"] = (res.get("per_class") or {}).get("test/acc")
    row["classes"] = (((res.get("data") or {}).get("target") or {}).get("classes"))
    return row


def headline(metrics: dict) -> str | None:
    """``acc``, or ``r2`` for a regression run (no ``test/acc``); None: the run measured neither."""
    return next((m for m in METRICS if metrics.get(f"test/{m}") is not None), None)


def key_columns(df: pd.DataFrame) -> list[str]:
    """Keys that vary, minus those another key already determines (``strategy._target_`` given
    ``strategy``). Strategy and budget always come first."""
    keys = [c for c in df.columns if c.startswith("k:")]
    # a key absent from some results (written before it existed) varies only if its values do
    varying = [c for c in keys if df[c].dropna().astype(str).nunique() > 1]
    for c in keys:
        df[c] = df[c].map(lambda v: "—" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
    # choices first (short names people read), then config values by depth
    varying.sort(key=lambda c: (c != "k:strategy", c != f"k:{BUDGET}", "." in c, c.count("."), c))
    kept: list[str] = []
    for c in varying:
        if kept and df.groupby([df[k].astype(str) for k in kept]).ngroups == \
                df.groupby([df[k].astype(str) for k in [*kept, c]]).ngroups:
            continue  # c adds no split that the kept keys do not already make
        kept.append(c)
    if "k:strategy" not in kept:
        kept.insert(0, "k:strategy")
    if f"k:{BUDGET}" not in kept and f"k:{BUDGET}" in df:
        kept.insert(1, f"k:{BUDGET}")
    return kept


def ci95(std: float, n: int) -> float:
    if n < 2 or not math.isfinite(std):
        return float("nan")
    return (T95[n - 2] if n - 1 <= len(T95) else 1.96) * std / math.sqrt(n)


def has(df: pd.DataFrame, col: str) -> bool:
    """Some run measured ``col`` (results written before it existed leave it empty)."""
    return col in df and pd.to_numeric(df[col], errors="coerce").notna().any()


def mean_std(values: pd.Series) -> tuple[float, float]:
    v = pd.to_numeric(values, errors="coerce").astype(float)
    return float(v.mean()), float(v.std(ddof=1)) if v.notna().sum() > 1 else float("nan")


def summarise(df: pd.DataFrame, keys: list[str], m: str = "acc") -> pd.DataFrame:
    """One row per group: mean/std/n/CI of the headline metric ``m``, gain over scratch, params,
    time; the mean (± std) of balanced accuracy, rmse, LogME, LEEP when some run has them."""
    optional = [c for c in ("balanced_acc", "rmse", *SCORES) if has(df, c)]
    out = []
    for vals, g in df.groupby(keys, sort=False, dropna=False):
        mean, std = mean_std(g[m])
        row = {**dict(zip(keys, vals)), "n": len(g), "seeds": ",".join(str(s) for s in sorted(g["seed"])),
               f"{m}_mean": mean, f"{m}_std": std, f"{m}_ci95": ci95(std, len(g))}
        if "balanced_acc" in optional:
            row["balanced_acc_mean"], row["balanced_acc_std"] = mean_std(g["balanced_acc"])
        if "rmse" in optional:
            row["rmse_mean"] = mean_std(g["rmse"])[0]
        row.update({f"source_{m}": mean_std(g[f"source_{m}"])[0],
                    "trainable": pd.to_numeric(g["trainable"], errors="coerce").max(),
                    "time_s": mean_std(g["time_s"])[0]})
        row.update({s: mean_std(g[s])[0] for s in SCORES if s in optional})
        out.append(row)
    table = pd.DataFrame(out)
    add_gain(table, keys, m)
    return ordered(table, keys)


def ordered(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Rows sorted by the non-strategy keys then strategy (stable); ``k:`` prefixes dropped."""
    table = table.sort_values([k for k in keys if k != "k:strategy"] + ["k:strategy"],
                              key=lambda s: s.map(sort_key), kind="stable").reset_index(drop=True)
    return table.rename(columns={k: k[2:] for k in keys})


def sort_key(v: Any) -> Any:
    """Numbers numerically, ``scratch`` first (the baseline reads first), the rest as text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"0{float(v):020.6f}"
    return "1" if v == "scratch" else f"2{v}"


def add_gain(table: pd.DataFrame, keys: list[str], m: str = "acc") -> None:
    """Gain over ``scratch`` with the same non-strategy keys (falling back to the target-side keys:
    scratch ignores source settings). Negative gain = negative transfer."""
    other = [k for k in keys if k != "k:strategy" and not k.startswith("k:strategy.")]
    target_side = [k for k in other if k.startswith(("k:target", f"k:{BUDGET}"))]
    scratch = table[table["k:strategy"] == "scratch"]
    gains = []
    for _, r in table.iterrows():
        gain = float("nan")
        for match in (other, target_side):
            s = scratch
            for k in match:
                s = s[s[k].astype(str) == str(r[k])]
            if len(s) == 1:
                gain = r[f"{m}_mean"] - float(s[f"{m}_mean"].iloc[0])
                break
        gains.append(float("nan") if r["k:strategy"] == "scratch" else gain)
    table["gain_vs_scratch"] = gains
    table["negative_transfer"] = [g < 0 for g in gains]


def per_class_table(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame | None:
    """Group × class: per-class test accuracy (``per_class["test/acc"]``), mean over seeds.

    Columns ``class <label>`` from ``data.target.classes`` when every group has the same classes,
    else ``class #<i>`` (remapped index) and a ``classes`` column. None: no run recorded it."""
    runs = df[df["per_class"].map(lambda v: isinstance(v, list))] if "per_class" in df else df.iloc[:0]
    if runs.empty:
        return None
    labels = {json.dumps(c) for c in runs["classes"]}
    width = max(map(len, runs["per_class"]))
    shared = json.loads(labels.pop()) if len(labels) == 1 else None
    named = isinstance(shared, list) and len(shared) == width
    names = [f"class {c}" for c in shared] if named else [f"class #{i}" for i in range(width)]
    out = []
    for vals, g in runs.groupby(keys, sort=False, dropna=False):
        # ragged vectors pad with NaN; a class absent from a seed's test set (NaN) is skipped
        means = pd.DataFrame(list(g["per_class"])).astype(float).mean().reindex(range(width))
        row = {**dict(zip(keys, vals)), "n": len(g)} | ({} if named else {"classes": g["classes"].iloc[0]})
        out.append(row | dict(zip(names, means)))
    return ordered(pd.DataFrame(out), keys)


def ranking_table(df: pd.DataFrame, keys: list[str], m: str = "acc") -> pd.DataFrame | None:
    """One row per source with transferability scores (mean LogME, LEEP and metric ``m`` over
    seeds) within each setting of the non-source keys that has ≥ 3 sources, and Kendall's τ of
    each score vs ``m`` over them (``tau_logme``, ``tau_leep``). None: no such setting.

    A source is a combination of the varying ``source.*`` keys (model, data, classes, ...)."""
    # model, then data, then the rest (classes, epochs, ...): how people name a source
    src = sorted((k for k in keys if k.startswith("k:source.")),
                 key=lambda k: (not k.startswith("k:source.model"), not k.startswith("k:source.data")))
    if not src or not any(has(df, s) for s in SCORES):
        return None
    ctx = [k for k in keys if k not in src]
    scores = df[[s for s in SCORES if s in df]].apply(pd.to_numeric, errors="coerce")
    scored = df[scores.notna().any(axis=1)]
    rows = []
    for cvals, g in scored.groupby(ctx, sort=False, dropna=False):
        sources = [{"source": ", ".join(f"{k[len('k:source.'):]}={v}" for k, v in zip(src, svals)),
                    "n": len(s), **{c: mean_std(s[c])[0] for c in (*SCORES, m) if c in s}}
                   for svals, s in g.groupby(src, sort=False, dropna=False)]
        if len(sources) < 3:
            continue
        taus = {f"tau_{s}": tau(sources, s, m) for s in SCORES}
        rows += [{**dict(zip(ctx, cvals)), **r, "n_sources": len(sources), **taus}
                 for r in sorted(sources, key=lambda r: -r[m])]
    return ordered(pd.DataFrame(rows), ctx) if rows else None


def tau(rows: list[dict], score: str, m: str) -> float:
    """Kendall's τ of ``score`` vs ``m`` over the rows having both (NaN below 3 such rows)."""
    pairs = [(r[score], r[m]) for r in rows if math.isfinite(r.get(score, math.nan) + r[m])]
    return kendall_tau(*zip(*pairs)) if len(pairs) >= 3 else math.nan


def report(root: str | Path, out: str | Path | None = None, plot: bool = True) -> dict[str, Any]:
    """Read every results.json below ``root``; write report.md, report.csv (per_class.csv,
    ranking.csv) and plots into ``out`` (default ``<root>/report``).

    Returns ``{"table", "keys", "per_class", "ranking", "sections", "problems", "markdown",
    "files"}``: the first four for the first headline metric, ``sections[m]`` the same four per
    metric (``acc``, ``r2``) present."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: {root}: no such directory")
    out = Path(out) if out else root / "report"
    df, problems = collect(root)
    tail = [problems_markdown(problems)] if problems else []
    if df.empty:
        md = "\n".join([markdown(pd.DataFrame(columns=["negative_transfer"]), []), *tail])
        atomic_write_text(out / "report.md", f"No finished runs under {root}.\n\n{md}")
        return {"table": df, "keys": [], "per_class": None, "ranking": None, "sections": {},
                "problems": problems, "markdown": md, "files": []}
    present = [m for m in METRICS if (df["metric"] == m).any()]
    parts, files, sections = [], [], {}
    for i, m in enumerate(present):
        sub = df[df["metric"] == m].copy()
        keys = key_columns(sub)
        table, per_class = summarise(sub, keys, m), per_class_table(sub, keys)
        ranking = ranking_table(sub, keys, m)
        names = [k[2:] for k in keys]
        sections[m] = {"table": table, "keys": names, "per_class": per_class, "ranking": ranking}
        suffix = "" if i == 0 else f"_{m}"
        if len(present) > 1:
            parts.append(f"## {'Classification' if m == 'acc' else 'Regression'}: test/{m}\n")
        parts.append(markdown(table, names, m))
        files.append(atomic_path(out / f"report{suffix}.csv", table.to_csv(index=False)))
        if per_class is not None:
            parts.append(per_class_markdown(per_class, names))
            files.append(atomic_path(out / f"per_class{suffix}.csv", per_class.to_csv(index=False)))
        if ranking is not None:
            parts.append(ranking_markdown(ranking, [n for n in names if n in ranking.columns], m))
            files.append(atomic_path(out / f"ranking{suffix}.csv", ranking.to_csv(index=False)))
        if plot:
            files += plots(table, names, out, m)
    md = "\n".join(parts + tail)
    files.insert(0, atomic_path(out / "report.md", f"# Report: {root}\n\n{md}"))
    return {**sections[present[0]], "sections": sections, "problems": problems, "markdown": md,
            "files": files}


def atomic_path(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="transfer-lab-report", description=__doc__.splitlines()[0])
    p.add_argument("dir", help="directory searched recursively for results.json")
    p.add_argument("--out", help="where report.md/report.csv/*.png go (default: <dir>/report)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    args = p.parse_args(argv)
    res = report(args.dir, args.out, plot=not args.no_plots)
    print(res["markdown"], end="")
    print(f"\nwrote {', '.join(str(f) for f in res['files'])}" if res["files"] else "", file=sys.stderr)


if __name__ == "__main__":
    main()
