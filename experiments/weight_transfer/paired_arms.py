"""Arms of the weight-transfer study from different presets, paired by seed against one baseline.

    python experiments/weight_transfer/paired_arms.py scratch=DIR matching=DIR net2net=DIR [--baseline scratch]

Each ``label=DIR`` is an evaluation directory (``<compare dir>/eval/<strategy>``) of cells with
seeds. ``transfer_lab.report`` pairs cells only within one context, and the ``experiment`` preset
is part of it: Net2Net (``experiment=weight_transfer_net2net``) is not paired there with the
``scratch`` of ``experiment=weight_transfer``, although that scratch is the same configuration
(the preset adds only ``strategy.widen``/``strategy.noise``, which ``scratch`` does not use).
This prints one markdown table with the report's own statistics
(``transfer_lab.analysis.paired``: mean, 95% t CI, wins, Wilcoxon p, verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from transfer_lab.analysis.aggregate import mean_std
from transfer_lab.analysis.collect import find_results
from transfer_lab.analysis.paired import paired_stats, verdict


def cells(path: Path) -> dict[int, dict]:
    out = {}
    for p in find_results(path):
        r = json.loads(p.read_text())
        if r.get("status") == "ok":
            out[int(r["seed"])] = r
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+", help="label=DIR")
    ap.add_argument("--baseline", default="scratch")
    a = ap.parse_args(argv)
    arms = dict(spec.split("=", 1) for spec in a.arms if "=" in spec)
    if len(arms) != len(a.arms) or a.baseline not in arms:
        print(f"error: give label=DIR pairs including {a.baseline}=DIR", file=sys.stderr)
        return 2
    runs = {k: cells(Path(v)) for k, v in arms.items()}
    base = runs[a.baseline]
    print(f"| arm | test acc (mean ± std) | per seed | paired diff vs {a.baseline} (95% CI; wins; p) "
          "| converged | selected step |")
    print("|---|---|---|---|---|---|")
    for name, cs in runs.items():
        seeds = sorted(cs)
        acc = [cs[s]["metrics"]["test/acc"] for s in seeds]
        m, sd = mean_std(acc)
        conv = sum(bool((cs[s].get("convergence") or {}).get("converged")) for s in seeds)
        diff = "—"
        if name != a.baseline:
            both = [s for s in seeds if s in base]
            st = paired_stats([cs[s]["metrics"]["test/acc"] - base[s]["metrics"]["test/acc"] for s in both])
            diff = (f"{st['paired_diff_mean']:+.3f} ± {st['paired_diff_ci95']:.3f}; {st['wins']}/{st['n_pairs']}; "
                    f"p {st['p_value']:.2f}, {verdict(st)}")
        steps = ", ".join(str((cs[s].get("selection") or {}).get("step")) for s in seeds)
        print(f"| {name} | {m:.3f} ± {sd:.3f} | {', '.join(f'{v:.3f}' for v in acc)} (seeds "
              f"{', '.join(map(str, seeds))}) | {diff} | {conv}/{len(seeds)} | {steps} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
