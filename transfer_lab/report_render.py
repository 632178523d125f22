"""Rendering a report's tables as markdown (``transfer_lab.report`` builds the tables;
``transfer_lab.analysis.report_plots`` draws the figures)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from transfer_lab.analysis.aggregate import fmt, pm
from transfer_lab.analysis.breakdowns import SCORES
from transfer_lab.analysis.collect import BUDGET
from transfer_lab.analysis.effective_labels import describe_effective
from transfer_lab.analysis.paired import is_baseline, verdict

MARK = "†"  # a group holding cells that did not converge
UNCONVERGED = ("partial", "none")


def key_cells(r: pd.Series, keys: list[str]) -> list[str]:
    return ["all" if k == BUDGET and r[k] == "null" else str(r[k]) for k in keys]


def key_names(keys: list[str]) -> list[str]:
    return ["labels/class" if k == BUDGET else k for k in keys]


def markdown(table: pd.DataFrame, keys: list[str], m: str = "acc", baseline: str = "scratch") -> str:
    """The main table; balanced acc, rmse, LogME and LEEP columns only when ``table`` has them,
    the paired columns when some group has a pair, ``converged`` when some cell recorded it."""
    bal, rmse = "balanced_acc_mean" in table, "rmse_mean" in table
    scores = [s for s in SCORES if s in table]
    paired = bool((table.get("n_pairs", pd.Series(dtype=float)) > 0).any())
    conv = bool((table.get("converged", pd.Series(dtype=object)) != "unknown").any())
    head = [*key_names(keys), f"test/{m} mean ± std", "n", "seeds", "95% CI",
            *["balanced acc mean ± std"] * bal, *["rmse"] * rmse, "gain vs scratch",
            *[f"paired diff vs {baseline} (95% CI)", "wins", "p (Wilcoxon)"] * paired,
            *["converged"] * conv, f"source {m}", "trainable params", "time (s)",
            *[{"logme": "LogME", "leep": "LEEP"}[s] for s in scores]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        gain = fmt(r["gain_vs_scratch"]) + (" ⚠ negative" if r["negative_transfer"] else "")
        mark = f" {MARK}" if r.get("converged") in UNCONVERGED else ""
        cells = [*key_cells(r, keys), f"{fmt(r[f'{m}_mean'])} ± {fmt(r[f'{m}_std'])}{mark}",
                 str(r["n"]), str(r["seeds"]), f"± {fmt(r[f'{m}_ci95'])}",
                 *([pm(r["balanced_acc_mean"], r["balanced_acc_std"])] if bal else []),
                 *([fmt(r["rmse_mean"])] if rmse else []), gain,
                 *(paired_cells(r, baseline) if paired else []), *([str(r["converged"])] if conv else []),
                 fmt(r[f"source_{m}"]), "—" if pd.isna(r["trainable"]) else f"{int(r['trainable']):,}",
                 fmt(r["time_s"], 1), *[fmt(r[s]) for s in scores]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_cells(r: pd.Series, baseline: str) -> list[str]:
    """``+0.0500 ± 0.0300 significant`` (``paired.verdict``; marked † when a side did not
    converge), ``2/3``, p."""
    if is_baseline(r, baseline):
        return ["(baseline)", "—", "—"]
    if not r["n_pairs"]:
        return ["—", "—", "—"]
    mark = f" {MARK}" if {r.get("converged"), r.get("_baseline_converged")} & set(UNCONVERGED) else ""
    diff = f"{r['paired_diff_mean']:+.4f} ± {fmt(r['paired_diff_ci95'])} {verdict(r)}{mark}"
    return [diff, f"{r['wins']}/{r['n_pairs']}", fmt(r["p_value"])]


def paired_note(table: pd.DataFrame, baseline: str) -> str:
    """What the paired columns mean and which test gave p (the methods actually used)."""
    if not (table.get("n_pairs", pd.Series(dtype=float)) > 0).any():
        return (f"No paired comparison: no group has `{baseline}` cells with the same seeds in its "
                "context.\n")
    used = sorted({m for m in table["p_method"].dropna() if m})
    fewest = int(table.loc[table["n_pairs"] > 0, "n_pairs"].min())
    return (f"Paired differences vs `{baseline}`: cells paired by seed within the same context (same "
            "source, labelled subset and initialisation); mean of the per-seed differences ± the "
            "half-width of its t-based 95% CI; *significant* only where that CI excludes 0 and p < "
            "0.05 (*n too small* where p cannot reach 0.05). Wins: seeds "
            f"where the strategy beat `{baseline}`. p: two-sided Wilcoxon signed-rank test (scipy), "
            f"{' / '.join(used)} p-value. With n pairs the exact test cannot give p below 2/2^n: "
            f"here the fewest pairs is {fewest} (smallest possible p {2 / 2 ** fewest:.3g}).\n")


def convergence_footnote(cells: pd.DataFrame) -> str:
    """The cells that did not converge, with the figures their convergence was judged on."""
    bad = cells[cells["cell_converged"].map(lambda v: isinstance(v, (bool, np.bool_)) and not v)]
    if bad.empty:
        return ""
    lines = [f"{MARK} Not converged ({len(bad)} cell{'s' * (len(bad) != 1)}): a mean marked {MARK} includes cells whose "
             "training had not converged (`convergence.converged: false`); read it as unfinished, "
             "not as the strategy's result.", ""]
    for _, c in bad.iterrows():
        figures = ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}"
                            for k, v in c["convergence"].items() if k != "converged")
        lines.append(f"- `{c['path']}` ({c['k:strategy']}, seed {c['seed']})"
                     + (f": {figures}" if figures else ""))
    return "\n".join(lines) + "\n"


def convergence_unrecorded(table: pd.DataFrame) -> str:
    if (table["converged"] != "unknown").any():
        return ""
    return ("Convergence: not recorded by these results (written before the convergence check); "
            "the `converged` column of report.csv says `unknown`.\n")


def per_class_markdown(table: pd.DataFrame, keys: list[str], m: str = "acc") -> str:
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


def tuned_markdown(comparison: dict, table: Any, keys: list[str], m: str) -> str:
    """Each strategy's tuned hyperparameters beside its test score (one line per table group)."""
    objective = comparison["protocol"].get("objective", "validation metric")
    head = [*key_names(keys), f"test/{m} mean ± std", "tuned hyperparameters", f"best {objective}", "trials"]
    lines = ["## Tuned hyperparameters", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        s = comparison["strategies"].get(str(r["strategy"]))
        tuned = [params_text(s["best_params"]), fmt(s.get("best_value")),
                 str(s.get("trials", "—"))] if s else ["not tuned (YAML defaults)", "—", "—"]
        lines.append("| " + " | ".join([*key_cells(r, keys),
                                         pm(r[f"{m}_mean"], r[f"{m}_std"]), *tuned]) + " |")
    return "\n".join(lines) + "\n"


def params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in sorted(params.items())) or "(defaults)"


def summary_line(counts: dict[str, int]) -> str:
    tuning = f"; {counts['tuning']} tuning trials (not tabulated)" if counts.get("tuning") else ""
    return (f"**Cells:** {counts['ok']} ok, {counts['failed']} failed, {counts['incomplete']} "
            f"incomplete{tuning}.\n")


def problems_markdown(problems: list[dict]) -> str:
    """Failed cells (with stage and error) and incomplete ones, listed separately."""
    failed = [p for p in problems if p["status"] == "failed"]
    other = [p for p in problems if p["status"] != "failed"]
    lines = []
    if failed:
        lines += [f"Failed cells ({len(failed)}), not in the tables:", ""]
        lines += [f"- `{p['path']}`: failed" + (f" in the {p['stage']} stage" if p.get("stage") else "")
                  + f": {p['error']}" for p in failed]
    if other:
        lines += [*([""] if lines else []), f"Incomplete cells ({len(other)}), not in the tables:", ""]
        lines += [f"- `{p['path']}`: {p['status']} ({p['error']})" for p in other]
    return "\n".join(lines) + "\n"


def effective_markdown(eff: pd.DataFrame, keys: list[str], m: str = "acc") -> str:
    """The effective-labels table (Hernandez et al. 2021)."""
    head = [*key_names(keys), f"test/{m} mean", "scratch would need (labels/class)",
            "labels transferred", "× real labels"]
    lines = [f"## Effective labels transferred (test/{m})", "",
             "For each strategy and label budget: how many labels per class `scratch` would need for "
             f"the same mean test/{m} (Hernandez et al. 2021, *Scaling Laws for Transfer*): scratch's "
             "mean accuracy, made monotone in the budget (isotonic fit), interpolated linearly in log "
             "budget. Outside scratch's measured budgets: `>` / `<` its largest / smallest budget, not "
             "an extrapolation. Labels transferred = effective − real.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in eff.iterrows():
        cells = [*key_cells(r, keys), fmt(r[f"{m}_mean"]), describe_effective(r),
                 fmt(r["labels_transferred"], 1), fmt(r["multiplier"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
