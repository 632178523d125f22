"""results.json files → one table (mean ± std, n, 95% CI, paired statistics vs the baseline,
convergence) + CSV + plots.

``python -m transfer_lab.report <dir> [<dir> ...] [--out DIR] [--no-plots] [--baseline STRATEGY|KEY=VALUE]``
(console script ``transfer-lab-report``; several directories are read as one table, ``--out``
required: e.g. a comparison run in parts, whose ``comparison.json`` protocols must be equal).
Results are read by ``transfer_lab.analysis.collect`` and grouped by
``transfer_lab.analysis.aggregate``: everything that varies across the directory except the seed
and the keys that do not change a result (``transfer_lab.results.NON_RESULT_KEYS``). Failed cells
(with their stage and error) and unfinished ones are listed and counted, never dropped silently.

Per group: mean ± std, t-based 95% CI, gain over scratch, the paired difference against the
baseline (``--baseline``, default ``scratch``; cells paired by seed: mean, 95% CI, wins, Wilcoxon
p, see ``transfer_lab.analysis.paired``) and ``converged`` (all/partial/none/unknown, from each
cell's ``convergence.converged``; non-converged groups are marked † and their cells listed).
With ``comparison.json`` in ``<dir>``: the tuning protocol and each strategy's tuned
hyperparameters; without it the report says nothing was tuned. With the baseline at ≥ 3 label
budgets: effective labels transferred (``effective_labels.csv``, ``effective_labels.png``).

The headline metric is ``test/acc``, or ``test/r2`` for a regression run: columns ``r2_mean``, ...,
files ending in ``_r2`` when a directory mixes both. Optional columns appear when some result has
them: balanced accuracy, rmse, LogME/LEEP; a per-class table (``per_class.csv``) and a
transferability ranking of ≥ 3 sources (``ranking.csv``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from transfer_lab.analysis import collect as loader
from transfer_lab.analysis.aggregate import (converged_label, describe, mean_std, normalise_keys,
                                             ordered, varying_keys)
from transfer_lab.analysis.breakdowns import SCORES, has, per_class_table, ranking_table
from transfer_lab.analysis.collect import BUDGET, METRICS, headline
from transfer_lab.analysis.comparison import (is_tuning_trial, merge_comparisons, protocol_markdown,
                                              read_comparison)
from transfer_lab.analysis.effective_labels import effective_table
from transfer_lab.analysis.paired import add_paired, match_baseline, parse_baseline
from transfer_lab.analysis.report_plots import effective_plot, plots
from transfer_lab.errors import ConfigError
from transfer_lab.io import atomic_write_text
from transfer_lab.report_render import (convergence_footnote, convergence_unrecorded,
                                        effective_markdown, markdown, paired_note, per_class_markdown,
                                        problems_markdown, ranking_markdown, summary_line,
                                        tuned_markdown)

__all__ = ["collect", "headline", "key_columns", "main", "report", "summarise"]


def collect(root: Path) -> tuple[pd.DataFrame, list[dict]]:
    """One row per finished cell; a list of failed/unfinished cells (path, status, stage, error)."""
    cells, problems = loader.load(root)
    return pd.DataFrame([row_of(c) for c in cells]), problems


def collect_all(roots: list[Path]) -> tuple[pd.DataFrame, list[dict]]:
    """``collect`` of each directory, as one. Directories that are one another or inside one
    another are refused, and so is a cell whose config (hash) is under two of them (a copied
    directory): either would count cells twice."""
    real = [r.resolve() for r in roots]
    for a, ra in zip(roots, real):
        for b, rb in zip(roots, real):
            if a is not b and (ra == rb or ra in rb.parents):
                raise ConfigError(f"{b}: inside {a} (or the same directory): its cells would count twice")
    frames, problems, owner = [], [], {}
    for r in roots:
        df, found = collect(r)
        problems += found
        hashes = {h for h in df.get("config_hash", []) if isinstance(h, str)}  # older results: none
        for digest in hashes:
            if digest in owner:
                path = df.loc[df["config_hash"] == digest, "path"].iloc[0]
                raise ConfigError(f"{path}: the same cell (same config) as one under {owner[digest]}: "
                                  "each directory must hold other cells (a copy?)")
            owner[digest] = r
        frames.append(df)
    return pd.concat(frames, ignore_index=True), problems


def row_of(cell: loader.Cell) -> dict[str, Any]:
    """Keys (``k:`` prefix) are the group keys; the rest are measurements."""
    res = cell.result
    row = {f"k:{k}": v for k, v in cell.keys.items()}
    src, timings, params = res.get("source") or {}, res.get("timings") or {}, res.get("params") or {}
    metrics = res["metrics"]
    m = headline(metrics)
    conv = res.get("convergence") if isinstance(res.get("convergence"), dict) else {}
    row.update({"seed": res.get("seed"), "metric": m, m: metrics[f"test/{m}"], "path": str(cell.path),
                f"source_{m}": src.get(f"test/{m}"), "trainable": params.get("trainable"),
                "total_params": params.get("total"), "time_s": timings.get("total_s"),
                "cell_converged": conv.get("converged"), "convergence": conv,
                "config_hash": res.get("config_hash"),
                "tuning_trial": is_tuning_trial(res)})
    row.update({c: metrics.get(f"test/{c}") for c in ("balanced_acc", "rmse")})
    row.update({c: (res.get("transferability") or {}).get(c) for c in SCORES})
    row["per_class"] = (res.get("per_class") or {}).get("test/acc")
    target = (res.get("data") or {}).get("target") or {}
    # image folders name their classes (folder names, in the remapped order); others have labels
    row["classes"] = target.get("class_names") or target.get("classes")
    return row


def key_columns(df: pd.DataFrame) -> list[str]:
    """The grouping keys of ``df`` (the aggregator's rule); strategy and budget always first."""
    keys = [c for c in df.columns if c.startswith("k:")]
    normalise_keys(df, keys)
    kept = varying_keys(df, keys, first=("k:strategy", f"k:{BUDGET}"))
    if "k:strategy" not in kept:
        kept.insert(0, "k:strategy")
    if f"k:{BUDGET}" not in kept and f"k:{BUDGET}" in df:
        kept.insert(1, f"k:{BUDGET}")
    return kept


def summarise(df: pd.DataFrame, keys: list[str], m: str = "acc",
              baseline: str = "scratch") -> pd.DataFrame:
    """One row per group: mean/std/n/CI of metric ``m``, gain over scratch, params, time,
    convergence, the paired statistics vs ``baseline``; the mean (± std) of balanced accuracy,
    rmse, LogME, LEEP when some run has them."""
    optional = [c for c in ("balanced_acc", "rmse", *SCORES) if has(df, c)]
    out = []
    for vals, g in df.groupby(keys, sort=False, dropna=False):
        d = describe(g[m])
        row = {**dict(zip(keys, vals)), "n": len(g), "seeds": ",".join(str(s) for s in sorted(g["seed"])),
               f"{m}_mean": d["mean"], f"{m}_std": d["std"], f"{m}_ci95": d["ci95"]}
        if "balanced_acc" in optional:
            row["balanced_acc_mean"], row["balanced_acc_std"] = mean_std(g["balanced_acc"])
        if "rmse" in optional:
            row["rmse_mean"] = mean_std(g["rmse"])[0]
        row.update({f"source_{m}": mean_std(g[f"source_{m}"])[0],
                    "trainable": pd.to_numeric(g["trainable"], errors="coerce").max(),
                    "time_s": mean_std(g["time_s"])[0], "converged": converged_label(g["cell_converged"])})
        row.update({s: mean_std(g[s])[0] for s in SCORES if s in optional})
        out.append(row)
    table = pd.DataFrame(out)
    add_gain(table, keys, m)
    add_paired(table, df, keys, m, baseline)
    return ordered(table, keys, parse_baseline(baseline)[1])


def add_gain(table: pd.DataFrame, keys: list[str], m: str = "acc") -> None:
    """Gain of the group mean over ``scratch``'s in the same context (unpaired; the paired
    columns carry the statistics). Negative gain = negative transfer."""
    gains = []
    for _, r in table.iterrows():
        s = None if r["k:strategy"] == "scratch" else match_baseline(table, r, keys, "scratch")
        gains.append(float("nan") if s is None else r[f"{m}_mean"] - float(s[f"{m}_mean"]))
    table["gain_vs_scratch"] = gains
    table["negative_transfer"] = [g < 0 for g in gains]


def section(df: pd.DataFrame, m: str, baseline: str, comparison: dict | None) -> dict[str, Any]:
    """The tables of one headline metric: summary, per-class, ranking, effective labels."""
    keys = key_columns(df)
    names = [k[2:] for k in keys]
    table = summarise(df, keys, m, baseline)
    if comparison is not None:
        tuned = {k: json.dumps(v.get("best_params"), sort_keys=True)
                 for k, v in comparison["strategies"].items()}
        table["tuned_params"] = table["strategy"].map(lambda s: tuned.get(str(s)))
    return {"table": table, "keys": names, "per_class": per_class_table(df, keys),
            "ranking": ranking_table(df, keys, m), "effective": effective_table(table, names, m),
            "cells": df}


def write_report(where: str, out: Path, sections: dict[str, dict], problems: list[dict],
                 counts: dict[str, int], comparison: dict | None, baseline: str,
                 plot: bool) -> tuple[str, list[Path]]:
    """report.md and the CSVs (plots when ``plot``) in ``out``; returns the markdown and the files."""
    parts = [summary_line(counts)]
    if sections or comparison is not None:  # "untuned" says nothing when nothing finished
        parts.append(protocol_markdown(comparison, where, counts["tuning"]))
    files: list[Path] = []
    if not sections:
        parts.insert(0, f"No finished runs under {where}.\n")
    for i, (m, sec) in enumerate(sections.items()):
        suffix, names, table = "" if i == 0 else f"_{m}", sec["keys"], sec["table"]
        if len(sections) > 1:
            parts.append(f"## {'Classification' if m == 'acc' else 'Regression'}: test/{m}\n")
        parts += [markdown(table, names, m, baseline), convergence_footnote(sec["cells"]),
                  convergence_unrecorded(table), paired_note(table, baseline)]
        if comparison is not None:
            parts.append(tuned_markdown(comparison, table, names, m))
        public = table[[c for c in table.columns if not c.startswith("_")]]
        files.append(write(out / f"report{suffix}.csv", public.to_csv(index=False)))
        for name, csv, render in (("per_class", "per_class", per_class_markdown),
                                  ("ranking", "ranking", ranking_markdown),
                                  ("effective", "effective_labels", effective_markdown)):
            if sec[name] is not None:
                parts.append(render(sec[name], [n for n in names if n in sec[name].columns], m))
                files.append(write(out / f"{csv}{suffix}.csv", sec[name].to_csv(index=False)))
        if plot:
            files += plots(table, names, out, m)
            if sec["effective"] is not None:
                files.append(effective_plot(sec["effective"], names, out / f"effective_labels{suffix}.png"))
    if problems:
        parts.append(problems_markdown(problems))
    md = "\n".join(p for p in parts if p)
    files.insert(0, write(out / "report.md", f"# Report: {where}\n\n{md}"))
    return md, files


def write(path: Path, text: str) -> Path:
    atomic_write_text(path, text)
    return path


def report(root: str | Path | Sequence[str | Path], out: str | Path | None = None, plot: bool = True,
           baseline: str = "scratch") -> dict[str, Any]:
    """Read every results.json below ``root`` (a directory, or several read as one: e.g. the parts
    of a comparison run in parts, each with its ``comparison.json``); write report.md, report.csv
    (per_class.csv, ranking.csv, effective_labels.csv) and plots into ``out`` (default
    ``<root>/report``; required with several directories).

    Returns ``{"table", "keys", "per_class", "ranking", "effective", "sections", "problems",
    "counts", "comparison", "markdown", "files"}``: the first five for the first headline metric,
    ``sections[m]`` the same per metric (``acc``, ``r2``) present. Raises ``ConfigError`` on a
    missing directory, an unreadable comparison.json, comparisons under different protocols, the
    same cell under two directories or a ``baseline`` no cell ran."""
    roots = [Path(r) for r in ([root] if isinstance(root, (str, Path)) else root)]
    if not roots:
        raise ConfigError("no directory given (pass the sweep directory holding results.json files)")
    for r in roots:
        if not r.is_dir():
            raise ConfigError(f"{r}: no such directory (pass the sweep directory holding results.json files)")
    if len(roots) > 1 and out is None:
        raise ConfigError(f"{len(roots)} directories: give --out (where their one report goes)")
    comparison = merge_comparisons([(r, read_comparison(r)) for r in roots])
    df, problems = collect_all(roots)
    where = ", ".join(map(str, roots))  # what the report says it read
    # evaluation cells are the result, tuning trials (tuning seed) are not — also on a parent of several
    # comparisons (no comparison.json of its own); a directory of tuning trials only is reported as is
    mixed = not df.empty and not df["tuning_trial"].all()
    tuning = int(df["tuning_trial"].sum()) if mixed else 0
    if tuning:
        df = df[~df["tuning_trial"]].reset_index(drop=True)
    check_baseline(df, baseline)
    present = [m for m in METRICS if not df.empty and (df["metric"] == m).any()]
    sections = {m: section(df[df["metric"] == m].copy(), m, baseline, comparison) for m in present}
    counts = {"ok": len(df), "failed": sum(map(loader.is_failure, problems)),
              "incomplete": sum(not loader.is_failure(p) for p in problems), "tuning": tuning}
    md, files = write_report(where, Path(out) if out else roots[0] / "report", sections, problems, counts,
                              comparison, baseline, plot)
    first = sections[present[0]] if present else {"table": df, "keys": [], "per_class": None,
                                                   "ranking": None, "effective": None}
    return {**{k: first.get(k) for k in ("table", "keys", "per_class", "ranking", "effective")},
            "sections": sections, "problems": problems, "counts": counts, "comparison": comparison,
            "markdown": md, "files": files}


def check_baseline(df: pd.DataFrame, baseline: str) -> None:
    """A baseline no cell has fails with one line (the default ``scratch`` may be absent: no pairs)."""
    if df.empty or baseline == "scratch":
        return
    key, value = parse_baseline(baseline)
    keys = [] if key == "strategy" else [k[2:] for k in key_columns(df.copy()) if k != "k:strategy"]
    if key != "strategy" and key not in keys:
        raise ConfigError(f"--baseline {baseline}: {key} is not a key the report groups by here "
                          f"(keys: {', '.join(keys) or 'none but strategy'})")
    values = sorted(map(str, df[f"k:{key}"].unique()))
    if value not in values:
        what = "strategy" if key == "strategy" else f"{key} value"
        raise ConfigError(f"--baseline {baseline}: no cell ran that {what} ({key} here: {', '.join(values)})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="transfer-lab-report", description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="+", help="directory searched recursively for results.json; several "
                                          "are read as one (then --out is required)")
    p.add_argument("--out", help="where report.md/report.csv/*.png go (default: <dir>/report)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--baseline", default="scratch",
                   help="what every other group is paired against by seed: a strategy (default: scratch) "
                        "or KEY=VALUE on any key the report groups by (e.g. strategy.imbalance=none)")
    args = p.parse_args(argv)
    try:
        res = report(args.dir, args.out, plot=not args.no_plots, baseline=args.baseline)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(res["markdown"], end="")
    print(f"\nwrote {', '.join(str(f) for f in res['files'])}" if res["files"] else "", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
