"""Rendering a report's summary tables: markdown tables and PNG plots (``transfer_lab.report``
builds the tables; this file only draws them)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from transfer_lab.io import atomic_write_bytes

BUDGET = "target.data.samples_per_class"
# transferability scores of the source on the target, computed before training
SCORES = ("logme", "leep")


def fmt(v: float, digits: int = 4) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def pm(mean: float, std: float) -> str:
    """``mean ± std``; "—" for a group where no run measured it (older results)."""
    return f"{fmt(mean)} ± {fmt(std)}" if math.isfinite(mean) else "—"


def key_cells(r: pd.Series, keys: list[str]) -> list[str]:
    return ["all" if k == BUDGET and r[k] == "null" else str(r[k]) for k in keys]


def key_names(keys: list[str]) -> list[str]:
    return ["labels/class" if k == BUDGET else k for k in keys]


def markdown(table: pd.DataFrame, keys: list[str], m: str = "acc") -> str:
    """The main table; balanced acc, rmse, LogME and LEEP columns only when ``table`` has them."""
    bal, rmse = "balanced_acc_mean" in table, "rmse_mean" in table
    scores = [s for s in SCORES if s in table]
    head = [*key_names(keys), f"test/{m} mean ± std", "n", "seeds", "95% CI",
            *["balanced acc mean ± std"] * bal, *["rmse"] * rmse, "gain vs scratch", f"source {m}",
            "trainable params", "time (s)", *[{"logme": "LogME", "leep": "LEEP"}[s] for s in scores]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        gain = fmt(r["gain_vs_scratch"]) + (" ⚠ negative" if r["negative_transfer"] else "")
        cells = [*key_cells(r, keys), f"{fmt(r[f'{m}_mean'])} ± {fmt(r[f'{m}_std'])}",
                 str(r["n"]), str(r["seeds"]), f"± {fmt(r[f'{m}_ci95'])}",
                 *([pm(r["balanced_acc_mean"], r["balanced_acc_std"])] if bal else []),
                 *([fmt(r["rmse_mean"])] if rmse else []), gain, fmt(r[f"source_{m}"]),
                 "—" if pd.isna(r["trainable"]) else f"{int(r['trainable']):,}", fmt(r["time_s"], 1),
                 *[fmt(r[s]) for s in scores]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def per_class_markdown(table: pd.DataFrame, keys: list[str]) -> str:
    classes = [c for c in table.columns if c.startswith("class ")]
    head = [*key_names(keys), "n", *(["classes"] if "classes" in table else []), *classes]
    lines = ["## Per-class test accuracy (mean over seeds)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [*key_cells(r, keys), str(r["n"]), *([str(r["classes"])] if "classes" in table else []),
                 *[fmt(r[c]) for c in classes]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ranking_markdown(table: pd.DataFrame, ctx: list[str], m: str = "acc") -> str:
    lines = [f"## Transferability ranking (test/{m})", "",
             f"LogME and LEEP of each frozen source on the target training set (before training) vs "
             f"the test/{m} it then reached, means over seeds; Kendall's τ over the sources (1: a score "
             f"orders the sources as test/{m} does, −1: reversed)."]
    for cvals, g in table.groupby(ctx, sort=False, dropna=False):
        setting = ", ".join(f"{n}={v}" for n, v in zip(key_names(ctx), key_cells(g.iloc[0], ctx)))
        lines += ["", f"### {setting}: {len(g)} sources", "",
                  f"| source | n | LogME | LEEP | test/{m} |", "|---|---|---|---|---|"]
        lines += [f"| {r['source']} | {r['n']} | {fmt(r.get('logme'))} | {fmt(r.get('leep'))} | "
                  f"{fmt(r[m])} |" for _, r in g.iterrows()]
        lines += ["", f"Kendall's τ(LogME, test/{m}) = {fmt(g['tau_logme'].iloc[0], 2)}; "
                      f"τ(LEEP, test/{m}) = {fmt(g['tau_leep'].iloc[0], 2)} over {len(g)} sources."]
    return "\n".join(lines) + "\n"


def problems_markdown(problems: list[dict]) -> str:
    lines = [f"Failed or incomplete cells ({len(problems)}), not in the table:", ""]
    return "\n".join(lines + [f"- `{p['path']}`: {p['status']} ({p['error']})" for p in problems]) + "\n"


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
        fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(s) + 2), 3.6))
        ax.bar(range(len(s)), s[f"{m}_mean"], yerr=s[f"{m}_std"].fillna(0), capsize=3,
               color=["tab:gray" if st == "scratch" else "tab:red" if neg else "tab:blue"
                      for st, neg in zip(s["strategy"], s["negative_transfer"])])
        ax.set_xticks(range(len(s)), s["series"], rotation=30, ha="right", fontsize=7)
        ax.set(ylabel=f"test/{m} (mean ± std)",
               title=f"budget {b} labels/class (grey: scratch, red: below it)")
        name = b if b not in ("—", "null") else "all"  # no budget key / all labels: a plain file name
        written.append(save_fig(fig, out / f"{'' if m == 'acc' else m + '_'}bars_budget_{name}.png"))
    return written


def save_fig(fig: Any, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path
