"""The one aggregator: which keys split cells into groups, and mean ± std / 95% CI over a group.

One rule for a single seed: its mean is its value, its std and CI are undefined (NaN, printed
"—"): one run says nothing about the spread, and 0.0 would read as "perfectly reproducible".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from transfer_lab.analysis.collect import group_keys_of

MISSING = "—"


def finite(values: Iterable[Any]) -> np.ndarray:
    """The finite numbers among ``values`` (None, NaN and text dropped)."""
    v = pd.to_numeric(pd.Series(list(values), dtype=object), errors="coerce").astype(float)
    return v[np.isfinite(v)].to_numpy()


def mean_std(values: Iterable[Any]) -> tuple[float, float]:
    """Mean and sample std (ddof 1) of the finite values; std NaN below 2 values, both NaN at 0."""
    v = finite(values)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def t95(n: int) -> float:
    """Two-sided 95% Student t quantile for a mean of ``n`` values (NaN below 2)."""
    return float(stats.t.ppf(0.975, n - 1)) if n >= 2 else math.nan


def ci95(std: float, n: int) -> float:
    """Half-width of the t-based 95% CI of a mean of ``n`` values with sample std ``std``."""
    if n < 2 or not math.isfinite(std):
        return math.nan
    return t95(n) * std / math.sqrt(n)


def describe(values: Iterable[Any]) -> dict[str, float]:
    """``mean``, ``std``, ``n`` (finite values) and ``ci95`` (half-width) under the one rule."""
    v = finite(values)
    mean, std = mean_std(v)
    return {"mean": mean, "std": std, "n": len(v), "ci95": ci95(std, len(v))}


def fmt(v: Any, digits: int = 4) -> str:
    ok = isinstance(v, (int, float, np.floating)) and math.isfinite(v)
    return f"{v:.{digits}f}" if ok else MISSING


def pm(mean: float, std: float, digits: int = 4) -> str:
    """``mean ± std``; "—" for what no run measured, ``mean ± —`` for a single seed."""
    return f"{fmt(mean, digits)} ± {fmt(std, digits)}" if math.isfinite(mean) else MISSING


def normalise_keys(df: pd.DataFrame, keys: Sequence[str]) -> None:
    """A key some results lack (written before it existed) reads "—" in place of NaN/None."""
    for c in keys:
        df[c] = df[c].map(lambda v: MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else v)


def varying_keys(df: pd.DataFrame, keys: Sequence[str], first: Sequence[str] = ()) -> list[str]:
    """The ``keys`` of ``df`` whose values vary, minus those the others already determine
    (``strategy._target_`` given ``strategy``). ``first`` keys lead; then choices (short names
    people read), then config values by depth. Run ``normalise_keys`` first."""
    # a key absent from some results varies only if its present values do
    varying = [c for c in keys if df[c][df[c] != MISSING].astype(str).nunique() > 1]
    rank = {k: i for i, k in enumerate(first)}
    varying.sort(key=lambda c: (rank.get(c, len(rank)), "." in c, c.count("."), c))
    kept: list[str] = []
    for c in varying:
        if kept and groups(df, kept) == groups(df, [*kept, c]):
            continue  # c adds no split that the kept keys do not already make
        kept.append(c)
    return kept


def groups(df: pd.DataFrame, keys: list[str]) -> int:
    return df.groupby([df[k].astype(str) for k in keys]).ngroups


def ordered(table: pd.DataFrame, keys: list[str], baseline: str = "scratch") -> pd.DataFrame:
    """Rows sorted by the non-strategy keys then strategy (stable); ``k:`` prefixes dropped."""
    table = table.sort_values([k for k in keys if k != "k:strategy"] + ["k:strategy"],
                              key=lambda s: s.map(lambda v: sort_key(v, baseline)),
                              kind="stable").reset_index(drop=True)
    return table.rename(columns={k: k[2:] for k in keys})


def sort_key(v: Any, baseline: str = "scratch") -> Any:
    """Numbers numerically, the baseline first (it reads first), the rest as text."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return f"0{float(v):020.6f}"
    return "1" if v == baseline else f"2{v}"


def labels(results: Sequence[dict]) -> list[str]:
    """A short label per result naming its group (``key=value`` for each varying group key; "all"
    when nothing varies): the report's grouping rule, for the analyses."""
    df = pd.DataFrame([group_keys_of(r) for r in results])
    keys = list(df.columns)
    normalise_keys(df, keys)
    kept = varying_keys(df, keys, first=("strategy",))
    return [" ".join(f"{k}={r[k]}" for k in kept) or "all" for _, r in df.iterrows()]


def converged_label(flags: Iterable[Any]) -> str:
    """A group's convergence from its cells' ``convergence.converged`` (None: not recorded):
    ``all`` converged, ``none``, ``partial`` (some did not), ``unknown`` (some not recorded,
    the recorded ones converged)."""
    # bools may arrive as numpy bools; anything else (None, NaN) is "not recorded"
    flags = [bool(f) if isinstance(f, (bool, np.bool_)) else None for f in flags]
    no, yes = flags.count(False), flags.count(True)
    if no == 0:
        return "all" if yes == len(flags) and flags else "unknown"
    return "none" if no == len(flags) else "partial"
