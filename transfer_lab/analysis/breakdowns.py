"""Breakdowns of the report's groups: per-class test accuracy, and the ranking of sources by
transferability score (LogME, LEEP) against the accuracy they reached (Kendall's τ)."""

from __future__ import annotations

import json
import math
import pandas as pd

from transfer_lab.analysis.aggregate import mean_std, ordered
from transfer_lab.analysis.ranking import kendall_tau

# transferability scores of the source on the target, computed before training
SCORES = ("logme", "leep")


def has(df: pd.DataFrame, col: str) -> bool:
    """Some run measured ``col`` (results written before it existed leave it empty)."""
    return col in df and pd.to_numeric(df[col], errors="coerce").notna().any()


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
