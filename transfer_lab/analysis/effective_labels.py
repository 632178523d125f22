"""Effective labels transferred (Hernandez et al. 2021, "Scaling Laws for Transfer").

For a strategy reaching mean accuracy ``a`` with ``b`` labels per class: how many labels per class
would ``scratch`` need for the same ``a``? Scratch's mean accuracy against its label budgets is
made monotone (isotonic regression: more labels never cost accuracy, so a dip is seed noise) and
interpolated linearly in log budget, since accuracy grows roughly linearly in log data. Outside
scratch's measured range there is no estimate: "> max budget" / "< min budget", never an
extrapolation. ``labels_transferred = effective − real`` is Hernandez et al.'s D_T.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from scipy.optimize import isotonic_regression

from transfer_lab.analysis.collect import BUDGET
from transfer_lab.analysis.paired import baseline_contexts

MIN_BUDGETS = 3


def monotone_curve(budgets: Sequence[float], acc: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Budgets sorted ascending and the non-decreasing least-squares fit of ``acc`` to them."""
    order = np.argsort(budgets)
    b = np.asarray(budgets, dtype=float)[order]
    return b, isotonic_regression(np.asarray(acc, dtype=float)[order], increasing=True).x


def effective_labels(budgets: np.ndarray, curve: np.ndarray, acc: float) -> tuple[float, str]:
    """Labels per class at which the monotone ``curve`` reaches ``acc`` (log-linear between
    budgets; the smallest such budget on a flat stretch) and the bound: ``""`` inside the range,
    ``">"`` above it (value = max budget), ``"<"`` below it (value = min budget)."""
    # the isotonic fit averages pooled points: 0.65 may come back as 0.6499999999999999
    close = np.isclose(curve, acc, rtol=0, atol=1e-12)
    reached = (curve >= acc) | close
    if not reached.any():
        return float(budgets[-1]), ">"
    i = int(np.argmax(reached))  # the first budget whose fitted accuracy reaches acc
    if close[i]:
        return float(budgets[i]), ""
    if i == 0:
        return float(budgets[0]), "<"
    lo, hi = math.log(budgets[i - 1]), math.log(budgets[i])
    frac = (acc - curve[i - 1]) / (curve[i] - curve[i - 1])
    return float(math.exp(lo + frac * (hi - lo))), ""


def baseline_curve(base: pd.DataFrame, row: pd.Series, keys: Sequence[str],
                   m: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The baseline's monotone curve in ``row``'s context (``paired.baseline_contexts``, budget
    aside). None: no context with one baseline group per budget at ≥ 3 budgets."""
    for match in baseline_contexts([k for k in keys if k != BUDGET]):
        s = base
        for k in match:
            s = s[s[k].astype(str) == str(row[k])]
        b = pd.to_numeric(s[BUDGET]).to_numpy()
        if len(b) >= MIN_BUDGETS and len(np.unique(b)) == len(b):
            return monotone_curve(b, s[f"{m}_mean"].to_numpy())
    return None


def effective_table(table: pd.DataFrame, keys: Sequence[str], m: str = "acc",
                    baseline: str = "scratch") -> pd.DataFrame | None:
    """One row per non-baseline group with a numeric budget: ``effective_labels``, ``bound``,
    ``labels_transferred``, ``multiplier`` (effective / real). ``table`` is the report's summary
    (keys without ``k:``). None: no group whose context has the baseline at ≥ 3 numeric budgets."""
    if BUDGET not in table:
        return None
    budget = pd.to_numeric(table[BUDGET], errors="coerce")
    base = table[(table["strategy"] == baseline) & (budget > 0)]
    rows: list[dict[str, Any]] = []
    for i, r in table[(table["strategy"] != baseline) & (budget > 0)].iterrows():
        curve = baseline_curve(base, r, keys, m)
        if curve is None or not math.isfinite(r[f"{m}_mean"]):
            continue
        eff, bound = effective_labels(*curve, r[f"{m}_mean"])
        real = float(budget[i])
        rows.append({**{k: r[k] for k in keys}, f"{m}_mean": r[f"{m}_mean"], "effective_labels": eff,
                     "bound": bound, "labels_transferred": eff - real if not bound else math.nan,
                     "multiplier": eff / real if not bound else math.nan})
    return pd.DataFrame(rows) if rows else None


def describe_effective(row: pd.Series | dict) -> str:
    """``"37.2"``, ``"> 100"`` or ``"< 5"``."""
    b, v = row["bound"], row["effective_labels"]
    number = f"{v:.1f}" if v != int(v) else f"{int(v)}"
    return f"{b} {number}" if b else number
