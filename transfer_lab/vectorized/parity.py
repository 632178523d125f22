"""Parity of a vectorised sweep with the same sweep run cell by cell (``vectorize_seeds=false``).

    python -m transfer_lab.vectorized.parity <vectorised sweep dir> <separate sweep dir> [--metric test/acc]

Cells are paired by (strategy, seed); prints a markdown table per strategy (n, mean ± std of each
side, the difference of the means, the largest per-cell difference) and exits 1 unless every
cell is paired and ok, each strategy's means are within ``--mean-tol`` (0.01) and no cell differs
by more than ``--cell-tol`` (0.03): the acceptance rule of the issue that introduced grouping.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from transfer_lab.analysis.collect import load


def cells(root: str | Path, metric: str) -> tuple[dict[tuple[str, int], float], int]:
    """``{(strategy, seed): metric}`` of the finished cells below ``root``, and how many are not."""
    done, problems = load(root)
    return {(c.result["strategy"], int(c.result["seed"])): float(c.result["metrics"][metric])
            for c in done}, len(problems)


def compare(vec: dict, sep: dict) -> list[dict]:
    rows = []
    for strategy in sorted({s for s, _ in vec} | {s for s, _ in sep}):
        seeds = sorted({k for s, k in vec if s == strategy} & {k for s, k in sep if s == strategy})
        a, b = [vec[(strategy, k)] for k in seeds], [sep[(strategy, k)] for k in seeds]
        sd = (lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0)
        rows.append({"strategy": strategy, "n": len(seeds),
                     "vec": (statistics.fmean(a), sd(a)) if a else (float("nan"), 0.0),
                     "sep": (statistics.fmean(b), sd(b)) if b else (float("nan"), 0.0),
                     "max_cell": max((abs(x - y) for x, y in zip(a, b)), default=float("nan"))})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m transfer_lab.vectorized.parity",
                                description=__doc__.split("\n")[0])
    p.add_argument("vectorised")
    p.add_argument("separate")
    p.add_argument("--metric", default="test/acc")
    p.add_argument("--mean-tol", type=float, default=0.01)
    p.add_argument("--cell-tol", type=float, default=0.03)
    args = p.parse_args(argv)
    (vec, bad_vec), (sep, bad_sep) = cells(args.vectorised, args.metric), cells(args.separate, args.metric)
    rows = compare(vec, sep)
    print(f"| strategy | n | vectorised {args.metric} | separate {args.metric} | Δ mean | largest cell Δ (abs) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        (mv, sv), (ms, ss) = r["vec"], r["sep"]
        print(f"| {r['strategy']} | {r['n']} | {mv:.4f} ± {sv:.4f} | {ms:.4f} ± {ss:.4f} | "
              f"{mv - ms:+.4f} | {r['max_cell']:.4f} |")
    unpaired = len(set(vec) ^ set(sep))
    ok = (not unpaired and not bad_vec and not bad_sep
          and all(abs(r["vec"][0] - r["sep"][0]) <= args.mean_tol and r["max_cell"] <= args.cell_tol
                  for r in rows))
    print(f"\ncells: {len(vec)} vectorised, {len(sep)} separate, {unpaired} unpaired, "
          f"{bad_vec + bad_sep} not ok; means within {args.mean_tol} and cells within {args.cell_tol}: "
          f"{'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
