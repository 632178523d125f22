"""Aggregate per-run analyses over seeds: mean ± std tables grouped by what varies, with the
report's grouping and statistics (``transfer_lab.analysis.aggregate``)."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

from transfer_lab.analysis.aggregate import labels as run_labels
from transfer_lab.analysis.aggregate import mean_std, pm
from transfer_lab.analysis.ranking import kendall_tau

DIGITS = 3  # the analysis tables' precision (the report prints 4)


def group(results: list[dict], items: list[dict]) -> dict[str, list[dict]]:
    """Items grouped by their run's label (what varies across the runs, minus the seed and the
    keys that do not change a result: the report's groups)."""
    out: dict[str, list[dict]] = defaultdict(list)
    for label, item in zip(run_labels(results), items):
        out[label].append(item)
    return dict(sorted(out.items()))


def summarise_representations(groups: dict[str, list[dict]]) -> dict[str, dict]:
    """Per group: mean CKA matrix, diagonal CKA and drift per layer (mean, std), metrics."""
    out = {}
    for label, items in groups.items():
        items = [a for a in items if a.get("cka")]
        if not items:
            continue
        first = items[0]["cka"]
        same = [a for a in items if a["cka"]["source_layers"] == first["source_layers"]
                and a["cka"]["target_layers"] == first["target_layers"]]
        layers = list(first["diagonal"])
        drift_layers = [k for k, v in items[0]["drift"].items() if v is not None]
        out[label] = {
            "n": len(same), "source_layers": first["source_layers"],
            "target_layers": first["target_layers"],
            "cka": np.mean([a["cka"]["matrix"] for a in same], axis=0).tolist(),
            "diagonal": {p: mean_std([a["cka"]["diagonal"].get(p) for a in items]) for p in layers},
            "diagonal_source_bn_stats": {
                p: mean_std([(a["cka"].get("diagonal_source_bn_stats") or {}).get(p) for a in items])
                for p in layers},
            "drift": {p: mean_std([a["drift"].get(p) for a in items])[0] for p in drift_layers},
            "drift_std": {p: mean_std([a["drift"].get(p) for a in items])[1] for p in drift_layers},
            "bn_stats_drift": {p: mean_std([(a.get("bn_stats_drift") or {}).get(p) for a in items])
                               for p in drift_layers},
            "acc": mean_std([a["metrics"]["acc"] for a in items]),
            "balanced_acc": mean_std([a["metrics"]["balanced_acc"] for a in items])}
    return out


def representation_table(summary: dict[str, dict]) -> str:
    """Markdown: per group, same-layer CKA and drift per layer (mean ± std over seeds)."""
    lines = []
    for label, g in summary.items():
        lines += [f"\n{label} ({g['n']} seeds): test acc {pm(*g['acc'], DIGITS)}",
                  "| layer | CKA(source, target) same layer | same, target with source BN stats "
                  "| weight drift | BN statistics drift |", "|---|---|---|---|---|"]
        for p, ms in g["diagonal"].items():
            swap = pm(*g.get("diagonal_source_bn_stats", {}).get(p, (math.nan, math.nan)), DIGITS)
            d = pm(g["drift"][p], g["drift_std"][p], DIGITS) if p in g["drift"] else "—"
            b = pm(*g.get("bn_stats_drift", {}).get(p, (math.nan, math.nan)), DIGITS)
            lines.append(f"| {p} | {pm(*ms, DIGITS)} | {swap} | {d} | {b} |")
    return "\n".join(lines)


def metrics_table(groups: dict[str, list[dict]]) -> str:
    """Markdown: accuracy, balanced accuracy and per-class accuracy (mean ± std over seeds)."""
    lines = ["| runs | n | acc | balanced acc | per-class acc (mean) |", "|---|---|---|---|---|"]
    for label, items in groups.items():
        per_class = np.nanmean([m["per_class_acc"] for m in items], axis=0)
        lines.append(f"| {label} | {len(items)} | {pm(*mean_std([m['acc'] for m in items]), DIGITS)} | "
                     f"{pm(*mean_std([m['balanced_acc'] for m in items]), DIGITS)} | "
                     f"{' '.join(f'{a:.2f}' for a in per_class)} |")
    return "\n".join(lines)


def rank_summary(results: list[dict], scores: list[dict]) -> dict:
    """Kendall's τ of each score against test accuracy, per seed and on seed-averaged sources.

    Each run is one (source, seed); within a seed every run should use a different source.
    """
    labels = run_labels(results)
    by_seed: dict[int, list[int]] = defaultdict(list)
    for i, r in enumerate(results):
        by_seed[int(r["seed"])].append(i)
    acc = [r["metrics"]["test/acc"] for r in results]
    per_seed = {seed: {s: kendall_tau([scores[i][s] for i in idx], [acc[i] for i in idx])
                       for s in ("logme", "leep")} for seed, idx in sorted(by_seed.items())}
    rows = []
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        row = {"source": label, "n": len(idx)}
        for key, vals in (("logme", [scores[i]["logme"] for i in idx]),
                          ("leep", [scores[i]["leep"] for i in idx]), ("acc", [acc[i] for i in idx])):
            row[key], row[f"{key}_std"] = mean_std(vals)
        rows.append(row)
    pooled = {s: kendall_tau([r[s] for r in rows], [r["acc"] for r in rows]) for s in ("logme", "leep")}
    return {"rows": rows, "tau_per_seed": per_seed, "tau_of_means": pooled,
            "tau_seed_mean_std": {s: mean_std([t[s] for t in per_seed.values()]) for s in ("logme", "leep")}}


def rank_markdown(summary: dict) -> str:
    lines = ["| source | seeds | LogME | LEEP | fine-tuned test acc |", "|---|---|---|---|---|"]
    for r in sorted(summary["rows"], key=lambda r: -r["acc"]):
        lines.append(f"| {r['source']} | {r['n']} | {pm(r['logme'], r['logme_std'], DIGITS)} | "
                     f"{pm(r['leep'], r['leep_std'], DIGITS)} | {pm(r['acc'], r['acc_std'], DIGITS)} |")
    lines.append("")
    for s in ("logme", "leep"):
        per = ", ".join(f"seed {k}: {v[s]:.2f}" for k, v in summary["tau_per_seed"].items())
        m, sd = summary["tau_seed_mean_std"][s]
        lines.append(f"Kendall τ({s}, acc): {per}; mean ± std {pm(m, sd, 2)}; "
                     f"on seed-averaged sources {summary['tau_of_means'][s]:.2f}")
    return "\n".join(lines)
