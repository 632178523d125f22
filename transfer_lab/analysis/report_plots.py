"""The report's figures: test metric vs label budget, bars per budget, effective labels vs real
labels (``transfer_lab.report`` builds the tables; this file only draws them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from transfer_lab.analysis.collect import BUDGET
from transfer_lab.io import atomic_write_bytes


def series_label(r: pd.Series, keys: list[str]) -> str:
    parts = [str(r["strategy"])] + [f"{k}={r[k]}" for k in keys if k not in ("strategy", BUDGET)]
    return ", ".join(parts)


def plots(table: pd.DataFrame, keys: list[str], out: Path, m: str = "acc") -> list[Path]:
    """``test/<m>`` vs label budget (one line per strategy/setting, std error bars) and one bar
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
        ax.errorbar(x[order], s.loc[order, f"{m}_mean"], yerr=s.loc[order, f"{m}_std"].fillna(0),
                    marker="o", capsize=3, label=name, **base)
    if numeric.notna().all() and numeric.nunique() > 1 and (numeric > 0).all():
        ax.set_xscale("log")
        ax.set_xticks(sorted(numeric.unique()), [str(int(b)) for b in sorted(numeric.unique())])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set(xlabel="labels per class (target.data.samples_per_class)", ylabel=f"test/{m} (mean ± std)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    written.append(save_fig(fig, out / f"{m}_vs_budget.png"))
    for b, s in t.groupby(t["budget"].astype(str), sort=False):
        name = b if b not in ("—", "null") else "all"  # no budget key / all labels: a plain file name
        written.append(save_fig(bar_figure(s, m, b), out / f"{'' if m == 'acc' else m + '_'}bars_budget_{name}.png"))
    return written


def bar_figure(s: pd.DataFrame, m: str, budget: str) -> Any:
    """One budget's bars (grey: scratch, red: below it); the title on two lines so a figure of
    one or two bars does not clip it."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(s) + 2), 3.6))
    ax.bar(range(len(s)), s[f"{m}_mean"], yerr=s[f"{m}_std"].fillna(0), capsize=3,
           color=["tab:gray" if st == "scratch" else "tab:red" if neg else "tab:blue"
                  for st, neg in zip(s["strategy"], s["negative_transfer"])])
    ax.set_xticks(range(len(s)), s["series"], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel(f"test/{m} (mean ± std)")
    ax.set_title(f"budget {budget} labels/class\n(grey: scratch, red: below it)", fontsize=9)
    return fig


def effective_plot(eff: pd.DataFrame, keys: list[str], path: Path) -> Path:
    """Effective labels per class (what scratch would need for the same accuracy) against the real
    labels per class, one line per strategy/setting, log-log, with y = x (no transfer). Points
    outside scratch's range sit at its end, as triangles pointing away (▲ more, ▼ fewer)."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    e = eff.assign(series=[series_label(r, keys) for _, r in eff.iterrows()],
                   real=pd.to_numeric(eff[BUDGET]))
    for i, (name, s) in enumerate(e.groupby("series", sort=False)):
        s = s.sort_values("real")
        inside = s[s["bound"] == ""]
        line = ax.plot(inside["real"], inside["effective_labels"], marker="o", label=name)[0]
        for bound, marker in ((">", "^"), ("<", "v")):
            out = s[s["bound"] == bound]
            # series share the bound's value: nudge each a little so none hides another
            ax.scatter(out["real"] * 1.04 ** i, out["effective_labels"], marker=marker, color=line.get_color())
    lo = min(e["real"].min(), e["effective_labels"].min()) / 1.5
    hi = max(e["real"].max(), e["effective_labels"].max()) * 1.5
    ax.plot([lo, hi], [lo, hi], color="black", linestyle="--", label="y = x (no transfer)")
    ax.set(xscale="log", yscale="log", xlim=(lo, hi), ylim=(lo, hi),
           xlabel="labels per class (real)", ylabel="labels per class scratch would need",
           title="▲/▼: beyond scratch's largest / below its smallest budget")
    ticks = sorted(e["real"].unique())
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return save_fig(fig, path)


def save_fig(fig: Any, path: Path, dpi: int = 90) -> Path:
    """Write ``fig`` as a PNG atomically (a killed run never leaves half a figure) and close it."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
