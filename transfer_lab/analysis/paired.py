"""Paired statistics of a strategy against the baseline, cells paired by seed.

Within one group context (same budget, same everything but the strategy) a seed fixes the source
model, the labelled subset and the initialisation, so the per-seed difference ``strategy −
baseline`` removes most of the seed-to-seed noise that an unpaired comparison carries.

Per strategy group: mean paired difference, t-based 95% CI of that mean, wins (differences > 0)
out of the pairs, and the two-sided Wilcoxon signed-rank p (scipy). The p is exact (the full
null distribution over the 2^n sign patterns) for n ≤ 50 pairs without ties or zero differences;
with ties or zeros, an exhaustive permutation test for n ≤ 13 and the normal approximation above
(scipy's rule for ``method="auto"``). The smallest two-sided exact p with n pairs is 2 / 2^n:
fewer than 6 seeds can never give p < 0.05, whatever the differences.

The baseline (``--baseline``) is a strategy name (``scratch``), or ``key=value`` on any group key
the report splits by (``strategy.imbalance=none``, ``target.steps=800``): the groups with that
value are the baseline, each paired with the groups that differ from it in that key alone.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from transfer_lab.analysis.aggregate import ci95, finite
ALPHA = 0.05  # significance level of the paired verdict


def wilcoxon_method(d: np.ndarray) -> str:
    """How scipy's ``wilcoxon(method="auto")`` computes the p for differences ``d``."""
    nonzero = d[d != 0]
    clean = len(nonzero) == len(d) and len(np.unique(np.abs(d))) == len(d)
    if clean:
        return "exact" if len(d) <= 50 else "normal approximation"
    return "exact permutation" if len(d) <= 13 else "normal approximation"


def wilcoxon_p(diffs: Iterable[Any]) -> tuple[float, str]:
    """Two-sided Wilcoxon signed-rank p of ``diffs`` against 0, and how it was computed."""
    d = finite(diffs)
    if len(d) == 0:
        return math.nan, ""
    if not d.any():
        return 1.0, "all differences 0"  # scipy returns NaN here; no evidence of a difference
    return float(stats.wilcoxon(d, method="auto").pvalue), wilcoxon_method(d)


def paired_stats(diffs: Iterable[Any]) -> dict[str, Any]:
    """Mean, 95% CI half-width (t), wins, n, p, and ``significant``: the CI excludes 0 and p < 0.05."""
    d = finite(diffs)
    n = len(d)
    mean = float(d.mean()) if n else math.nan
    half = ci95(float(d.std(ddof=1)) if n > 1 else math.nan, n)
    p, method = wilcoxon_p(d)
    # both must agree: the t CI alone (normality, 3 seeds) would say "significant" beside a
    # Wilcoxon p that cannot go below 0.25
    significant = math.isfinite(half) and abs(mean) > half and p < ALPHA
    return {"paired_diff_mean": mean, "paired_diff_ci95": half, "wins": int((d > 0).sum()),
            "n_pairs": n, "p_value": p, "significant": significant, "p_method": method}


def too_few_pairs(n: int) -> bool:
    """With ``n`` pairs the smallest two-sided exact p is 2 / 2^n: below 6 pairs never < 0.05."""
    return 2 / 2 ** n >= ALPHA


def verdict(row: pd.Series | dict) -> str:
    """"significant" when the paired 95% CI excludes 0 and p < 0.05; else "not significant",
    saying so when there are too few pairs for the test ever to reach p < 0.05."""
    if row["significant"]:
        return "significant"
    if row["n_pairs"] and too_few_pairs(int(row["n_pairs"])):
        return f"not significant: n too small for p < {ALPHA:g}"
    return "not significant"


def parse_baseline(spec: str) -> tuple[str, str]:
    """``(key, value)`` of a baseline: ``scratch`` → ``("strategy", "scratch")``; ``k=v`` → ``("k", "v")``."""
    key, sep, value = str(spec).partition("=")
    return (key.strip(), value.strip()) if sep else ("strategy", str(spec))


def is_baseline(row: pd.Series | dict, spec: str) -> bool:
    """Whether a table row (keys with or without the ``k:`` prefix) is a baseline group. Values
    compare as text, as the report prints them (a null config value reads ``null``)."""
    key, value = parse_baseline(spec)
    v = row.get(f"k:{key}", row.get(key))
    return v is not None and str(v) == value


def baseline_contexts(keys: Sequence[str], baseline_key: str = "strategy") -> list[list[str]]:
    """The keys a baseline group must share with a row, strictest first: every key but the
    baseline's (for ``strategy``: also its ``strategy.*`` settings); then, for a strategy
    baseline, which may ignore source settings (scratch trains no source), every key but the
    ``source.*`` ones. Keys may carry the report table's ``k:`` prefix."""
    def name(k: str) -> str:
        return k[2:] if k.startswith("k:") else k

    if baseline_key != "strategy":
        return [[k for k in keys if name(k) != baseline_key]]
    other = [k for k in keys if name(k) != "strategy" and not name(k).startswith("strategy.")]
    return [other, [k for k in other if name(k) != "source" and not name(k).startswith("source.")]]


def match_baseline(table: pd.DataFrame, row: pd.Series, keys: Sequence[str],
                   baseline: str) -> pd.Series | None:
    """The baseline group of ``table`` in ``row``'s context (``baseline_contexts``). None: no
    unique one."""
    key, value = parse_baseline(baseline)
    if f"k:{key}" not in table:
        return None
    base = table[table[f"k:{key}"].astype(str) == value]
    for match in baseline_contexts(keys, key):
        s = base
        for k in match:
            s = s[s[k].astype(str) == str(row[k])]
        if len(s) == 1:
            return s.iloc[0]
    return None


def per_seed(df: pd.DataFrame, keys: Sequence[str], row: pd.Series, m: str) -> pd.Series:
    """Metric ``m`` by seed of the cells of ``row``'s group (a repeated seed: its mean)."""
    mask = np.logical_and.reduce([df[k].astype(str) == str(row[k]) for k in keys])
    g = df[mask]
    return pd.to_numeric(g[m], errors="coerce").groupby(g["seed"]).mean()


def add_paired(table: pd.DataFrame, df: pd.DataFrame, keys: Sequence[str], m: str,
               baseline: str) -> None:
    """Paired columns (``paired_stats``) vs ``baseline`` on every other group of ``table`` (NaN /
    0 pairs where no baseline group matches; the baseline's own rows stay empty)."""
    out = []
    for _, r in table.iterrows():
        b = None if is_baseline(r, baseline) else match_baseline(table, r, keys, baseline)
        if b is None:
            out.append({**paired_stats([]), "significant": None, "_baseline_converged": None})
            continue
        mine, base = per_seed(df, keys, r, m), per_seed(df, keys, b, m)
        both = mine.index.intersection(base.index)
        out.append({**paired_stats(mine[both] - base[both]),
                    "_baseline_converged": b.get("converged")})
    for col in out[0] if out else ():
        table[col] = [o[col] for o in out]
