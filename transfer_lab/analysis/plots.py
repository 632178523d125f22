"""Figures: CKA heat maps (source layers × target layers) and per-layer drift bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on the machines this runs on
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from transfer_lab.analysis.report_plots import save_fig  # noqa: E402


def _short(path: str) -> str:
    return path.removeprefix("backbone.")


def heatmap(ax, matrix: Sequence[Sequence[float]], rows: Sequence[str], cols: Sequence[str],
            title: str) -> None:
    m = np.asarray(matrix, dtype=float)
    im = ax.imshow(m, vmin=0, vmax=1, cmap="magma", origin="lower")
    ax.set_xticks(range(len(cols)), [_short(c) for c in cols], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), [_short(r) for r in rows], fontsize=8)
    ax.set_xlabel("target layer")
    ax.set_ylabel("source layer")
    ax.set_title(title, fontsize=9)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if m[i, j] < 0.6 else "black")
    return im


def drift_bars(ax, drift: dict[str, float | None], title: str,
               err: dict[str, float] | None = None,
               bn: dict[str, float | None] | None = None) -> None:
    """Weight drift per layer; BatchNorm-statistics drift beside it (hatched) when given."""
    names = [k for k, v in drift.items() if v is not None]
    x = np.arange(len(names))
    width = 0.4 if bn else 0.8
    yerr = [err.get(k, 0.0) for k in names] if err else None
    ax.bar(x - (width / 2 if bn else 0), [drift[k] for k in names], width, yerr=yerr,
           color="tab:blue", capsize=3, label="weights")
    if bn:
        ax.bar(x + width / 2, [bn.get(k) or 0.0 for k in names], width, color="tab:orange",
               hatch="//", label="BN running stats")
        ax.legend(fontsize=7)
    ax.set_xticks(x, [_short(n) for n in names], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("‖w − w_src‖ / ‖w_src‖")
    ax.set_title(title, fontsize=9)


def save_run_figures(result: dict, out_dir: Path) -> dict[str, str]:
    """``cka.png`` and ``drift.png`` for one analysed run; returns their file names."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    cka = result.get("cka")
    if cka:
        fig, ax = plt.subplots(figsize=(1.0 + 0.7 * len(cka["target_layers"]),
                                        1.2 + 0.6 * len(cka["source_layers"])))
        im = heatmap(ax, cka["matrix"], cka["source_layers"], cka["target_layers"],
                     f"linear CKA, {result['strategy']} seed {result['seed']}")
        fig.colorbar(im, ax=ax, fraction=0.046)
        save_fig(fig, out_dir / "cka.png", dpi=110)
        files["cka"] = "cka.png"
    if result.get("drift") and any(v is not None for v in result["drift"].values()):
        fig, ax = plt.subplots(figsize=(4.5, 3))
        drift_bars(ax, result["drift"], f"drift, {result['strategy']} seed {result['seed']}",
                   bn=result.get("bn_stats_drift"))
        save_fig(fig, out_dir / "drift.png", dpi=110)
        files["drift"] = "drift.png"
    return files


def save_summary_figure(groups: dict[str, dict], path: Path) -> None:
    """One column per group (e.g. strategy): its first run's CKA heat map over its mean drift."""
    n = len(groups)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 7.5), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 2]})
    for j, (label, g) in enumerate(groups.items()):
        heatmap(axes[0, j], g["cka"], g["source_layers"], g["target_layers"],
                f"{label}\nCKA (mean of {g['n']} seeds)")
        bn = {k: v[0] for k, v in g.get("bn_stats_drift", {}).items()}
        drift_bars(axes[1, j], g["drift"], f"{label}: drift (mean ± std)", g.get("drift_std"), bn)
    top = max([ax.get_ylim()[1] for ax in axes[1]])
    for ax in axes[1]:  # one scale, so the strategies compare at a glance
        ax.set_ylim(0, top)
    save_fig(fig, path, dpi=100)


def save_rank_figure(rows: list[dict], path: Path, taus: dict[str, float]) -> None:
    """Scatter of each score against the fine-tuned accuracy, one point per source."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, score in zip(axes, ("logme", "leep")):
        for r in rows:
            ax.errorbar(r[score], r["acc"], yerr=r.get("acc_std", 0), fmt="o", capsize=3)
            ax.annotate(r["short"], (r[score], r["acc"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
        ax.set_xlabel(score)
        ax.set_ylabel("target test acc after fine-tuning")
        ax.set_title(f"{score}: Kendall τ = {taus[score]:.2f}", fontsize=9)
    save_fig(fig, path, dpi=100)
