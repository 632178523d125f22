"""results.json files → one table (mean ± std, n, 95% CI, gain over scratch) + CSV + plots.

``python -m transfer_lab.report <dir> [--out DIR] [--no-plots]`` (console script
``transfer-lab-report``). Runs are grouped by everything that varies across the directory except
the seed: the config-group choices (strategy, models, data, ...) and any resolved config value
(e.g. ``target.data.samples_per_class``, the label budget). Failed runs (``status != ok``) and job
directories without a results.json are listed, never dropped silently.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from transfer_lab.io import atomic_write_bytes, atomic_write_text

BUDGET = "target.data.samples_per_class"
# never grouping keys: the seed is what we average over; where sources are kept changes nothing
IGNORED = {"seed", "store_dir", "data_dir"}
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
        acc = (res.get("metrics") or {}).get("test/acc")
        if res.get("status") != "ok" or acc is None:
            problems.append({"path": str(path.parent), "status": res.get("status", "?"),
                             "error": res.get("error", "no test/acc")})
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
    row.update({"seed": res.get("seed"), "acc": res["metrics"]["test/acc"], "path": str(path),
                "source_acc": src.get("test/acc"), "trainable": params.get("trainable"),
                "total_params": params.get("total"), "time_s": timings.get("total_s")})
    return row


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


def summarise(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per group: mean/std/n/CI of accuracy, gain over scratch, params, time."""
    keys = key_columns(df)
    out = []
    for vals, g in df.groupby(keys, sort=False, dropna=False):
        acc = g["acc"].astype(float)
        n, std = len(acc), float(acc.std(ddof=1)) if len(acc) > 1 else float("nan")
        out.append({**dict(zip(keys, vals)), "n": n, "seeds": ",".join(str(s) for s in sorted(g["seed"])),
                    "acc_mean": float(acc.mean()), "acc_std": std, "acc_ci95": ci95(std, n),
                    "source_acc": pd.to_numeric(g["source_acc"], errors="coerce").mean(),
                    "trainable": pd.to_numeric(g["trainable"], errors="coerce").max(),
                    "time_s": pd.to_numeric(g["time_s"], errors="coerce").mean()})
    table = pd.DataFrame(out)
    add_gain(table, keys)
    table = table.sort_values([k for k in keys if k != "k:strategy"] + ["k:strategy"],
                              key=lambda s: s.map(sort_key), kind="stable").reset_index(drop=True)
    return table.rename(columns={k: k[2:] for k in keys}), [k[2:] for k in keys]


def sort_key(v: Any) -> Any:
    """Numbers numerically, ``scratch`` first (the baseline reads first), the rest as text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"0{float(v):020.6f}"
    return "1" if v == "scratch" else f"2{v}"


def add_gain(table: pd.DataFrame, keys: list[str]) -> None:
    """Gain over ``scratch`` with the same non-strategy keys (falling back to the target-side keys:
    scratch ignores source settings). Negative gain = negative transfer."""
    other = [k for k in keys if k != "k:strategy" and not k.startswith("k:strategy.")]
    target_side = [k for k in other if k.startswith(("k:target", f"k:{BUDGET}"))]
    scratch = table[table["k:strategy"] == "scratch"]
    gains = []
    for _, r in table.iterrows():
        gain = float("nan")
        for match in (other, target_side):
            m = scratch
            for k in match:
                m = m[m[k].astype(str) == str(r[k])]
            if len(m) == 1:
                gain = r["acc_mean"] - float(m["acc_mean"].iloc[0])
                break
        gains.append(float("nan") if r["k:strategy"] == "scratch" else gain)
    table["gain_vs_scratch"] = gains
    table["negative_transfer"] = [g < 0 for g in gains]


def fmt(v: float, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def markdown(table: pd.DataFrame, keys: list[str], problems: list[dict], metric: str) -> str:
    names = ["labels/class" if k == BUDGET else k for k in keys]
    head = [*names, f"{metric} mean ± std", "n", "seeds", "95% CI", "gain vs scratch", "source acc",
            "trainable params", "time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        gain = fmt(r["gain_vs_scratch"])
        if r["negative_transfer"]:
            gain += " ⚠ negative"
        values = ["all" if k == BUDGET and r[k] == "null" else str(r[k]) for k in keys]
        cells = [*values, f"{fmt(r['acc_mean'])} ± {fmt(r['acc_std'])}",
                 str(r["n"]), str(r["seeds"]), f"± {fmt(r['acc_ci95'])}", gain, fmt(r["source_acc"]),
                 "—" if pd.isna(r["trainable"]) else f"{int(r['trainable']):,}", fmt(r["time_s"], 1)]
        lines.append("| " + " | ".join(cells) + " |")
    if problems:
        lines += ["", f"Failed or incomplete cells ({len(problems)}), not in the table:", ""]
        lines += [f"- `{p['path']}`: {p['status']} ({p['error']})" for p in problems]
    return "\n".join(lines) + "\n"


def series_label(r: pd.Series, keys: list[str]) -> str:
    parts = [str(r["strategy"])] + [f"{k}={r[k]}" for k in keys if k not in ("strategy", BUDGET)]
    return ", ".join(parts)


def plots(table: pd.DataFrame, keys: list[str], out: Path, metric: str) -> list[Path]:
    """Accuracy vs label budget (one line per strategy/setting, std error bars) and one bar
    chart per budget. Returns the files written."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = table.copy()
    t["series"] = [series_label(r, keys) for _, r in t.iterrows()]
    t["budget"] = t[BUDGET] if BUDGET in t else "—"
    numeric = pd.to_numeric(t["budget"], errors="coerce")
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, s in t.groupby("series", sort=False):
        x = pd.to_numeric(s["budget"], errors="coerce")
        if x.isna().all():
            x = pd.Series(range(len(s)), index=s.index)
        order = x.sort_values().index
        base = dict(color="black", linestyle="--") if (s["strategy"] == "scratch").all() else {}
        ax.errorbar(x[order], s.loc[order, "acc_mean"], yerr=s.loc[order, "acc_std"].fillna(0),
                    marker="o", capsize=3, label=name, **base)
    if numeric.notna().all() and numeric.nunique() > 1 and (numeric > 0).all():
        ax.set_xscale("log")
        ax.set_xticks(sorted(numeric.unique()), [str(int(b)) for b in sorted(numeric.unique())])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="labels per class (target.data.samples_per_class)", ylabel=f"{metric} (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_fig(fig, out / "acc_vs_budget.png"))
    for b, s in t.groupby(t["budget"].astype(str), sort=False):
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(s) + 2), 3.6))
        ax.bar(range(len(s)), s["acc_mean"], yerr=s["acc_std"].fillna(0), capsize=3,
               color=["tab:gray" if st == "scratch" else "tab:red" if neg else "tab:blue"
                      for st, neg in zip(s["strategy"], s["negative_transfer"])])
        ax.set_xticks(range(len(s)), s["series"], rotation=30, ha="right", fontsize=7)
        ax.set(ylabel=f"{metric} (mean ± std)", title=f"budget {b} labels/class (grey: scratch, red: below it)")
        written.append(save_fig(fig, out / f"bars_budget_{b}.png"))
    return written


def save_fig(fig: Any, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def report(root: str | Path, out: str | Path | None = None, plot: bool = True) -> dict[str, Any]:
    """Read every results.json below ``root``; write report.md, report.csv and plots into ``out``
    (default ``<root>/report``). Returns ``{"table", "keys", "problems", "markdown", "files"}``."""
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: {root}: no such directory")
    out = Path(out) if out else root / "report"
    df, problems = collect(root)
    metric = "test/acc"
    if df.empty:
        md = markdown(pd.DataFrame(columns=["negative_transfer"]), [], problems, metric)
        atomic_write_text(out / "report.md", f"No finished runs under {root}.\n\n{md}")
        return {"table": df, "keys": [], "problems": problems, "markdown": md, "files": []}
    table, keys = summarise(df)
    md = markdown(table, keys, problems, metric)
    atomic_write_text(out / "report.md", f"# Report: {root}\n\n{md}")
    atomic_write_text(out / "report.csv", table.to_csv(index=False))
    files = [out / "report.md", out / "report.csv"]
    if plot:
        files += plots(table, keys, out, metric)
    return {"table": table, "keys": keys, "problems": problems, "markdown": md, "files": files}


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
