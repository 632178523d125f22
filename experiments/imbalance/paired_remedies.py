"""The remedies of the long-tailed study against no remedy, paired by seed.

    python experiments/imbalance/paired_remedies.py DIR [--baseline none]

``DIR/<remedy>/`` is one ``python -m transfer_lab.compare ... dir=DIR/<remedy>`` per remedy (the
remedy is a data setting, not a strategy, so ``transfer_lab.report --baseline`` cannot pair them):
its ``comparison.json`` (tuned lr, best validation score) and ``eval/**/results.json`` (seeds).
Prints one markdown table: test and balanced accuracy (mean ± std), per-class accuracy, the paired
difference in balanced accuracy against the baseline remedy with the project's statistics
(``transfer_lab.analysis.paired``: mean, 95% t CI, wins, Wilcoxon p, verdict) and convergence.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from transfer_lab.analysis.aggregate import mean_std
from transfer_lab.analysis.collect import find_results
from transfer_lab.analysis.paired import paired_stats, verdict

ORDER = ("none", "resample", "reweight", "augment")


def cells(study: Path) -> dict[int, dict]:
    out = {}
    for p in find_results(study / "eval"):
        r = json.loads(p.read_text())
        if r.get("status") == "ok":
            out[int(r["seed"])] = r
    return out


def pm(values) -> str:
    m, s = mean_std(values)
    return f"{m:.3f} ± {s:.3f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir")
    ap.add_argument("--baseline", default="none")
    a = ap.parse_args(argv)
    root = Path(a.dir)
    studies = {d.name: d for d in sorted(root.iterdir()) if (d / "comparison.json").is_file()}
    if a.baseline not in studies:
        print(f"error: {root}/{a.baseline}/comparison.json missing (remedies here: {sorted(studies)})",
              file=sys.stderr)
        return 2
    base = cells(studies[a.baseline])
    print("| remedy | tuned lr (val/acc on tuning seed) | test acc | balanced acc | per-class acc, digits 5/6/7/8/9 "
          "| paired Δ balanced acc vs none (95% CI; wins; p) | converged |")
    print("|---|---|---|---|---|---|---|")
    for name in sorted(studies, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER)):
        comp = json.loads((studies[name] / "comparison.json").read_text())["strategies"]["finetune"]
        cs = cells(studies[name])
        seeds = sorted(cs)
        acc = [cs[s]["metrics"]["test/acc"] for s in seeds]
        bal = [cs[s]["metrics"]["test/balanced_acc"] for s in seeds]
        per = np.mean([cs[s]["per_class"]["test/acc"] for s in seeds], axis=0)
        conv = sum(bool((cs[s].get("convergence") or {}).get("converged")) for s in seeds)
        if name == a.baseline:
            diff = "—"
        else:
            both = [s for s in seeds if s in base]
            st = paired_stats([cs[s]["metrics"]["test/balanced_acc"] - base[s]["metrics"]["test/balanced_acc"]
                               for s in both])
            diff = (f"{st['paired_diff_mean']:+.3f} ± {st['paired_diff_ci95']:.3f}; {st['wins']}/{st['n_pairs']}; "
                    f"p {st['p_value']:.2f}, {verdict(st)}")
        lr = comp["best_params"].get("target.optimizer.lr")
        print(f"| {name} | {lr:.2g} ({comp['best_value']:.3f}) | {pm(acc)} | {pm(bal)} | "
              f"{' / '.join(f'{v:.2f}' for v in per)} | {diff} | {conv}/{len(seeds)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
