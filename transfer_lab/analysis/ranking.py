"""Kendall's τ: does a transferability score order sources the way fine-tuning does?"""

from __future__ import annotations

import math
from collections.abc import Sequence


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's τ-b of two paired sequences (ties in either count as neither agreement nor not).

    1: same order, −1: reversed, 0: unrelated. NaN when fewer than 2 pairs or either side is constant.
    """
    if len(a) != len(b):
        raise ValueError(f"kendall_tau: {len(a)} vs {len(b)} values; they must be paired")
    conc = disc = ties_a = ties_b = 0
    n = len(a)
    for i in range(n):
        for j in range(i + 1, n):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return (conc - disc) / denom if denom > 0 else math.nan


def rank_table(rows: list[dict], scores: Sequence[str] = ("logme", "leep"),
               target: str = "acc") -> dict[str, float]:
    """τ between each score and ``target`` over ``rows`` (one row per source)."""
    return {s: kendall_tau([r[s] for r in rows], [r[target] for r in rows]) for s in scores}
