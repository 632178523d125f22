"""The report under the comparison protocol (issue 14): convergence marks, paired statistics per
context, ``--baseline``, comparison.json, effective labels; grouping that ignores NON_RESULT_KEYS."""

import ast
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from test_report import fake_result  # the results.json fabricator of the report tests
from transfer_lab.report import main, report

# per-seed differences finetune − scratch: mean .025, t CI ± .0421 (crosses 0), 3 wins of 4, p .25
DIFFS = [0.02, 0.05, -0.01, 0.04]


def converge(flag, **figures):
    return {"convergence": {"converged": flag, **figures}}


def test_non_converged_cells_are_marked_and_listed(tmp_path):
    for seed in (0, 1, 2):
        late = converge(False, val_change=0.031, loss_change=-0.2) if seed == 2 else converge(True)
        fake_result(tmp_path / f"s{seed}", "scratch", seed, 0.5, extra=late)
        fake_result(tmp_path / f"f{seed}", "finetune", seed, 0.7, extra=converge(True))
        fake_result(tmp_path / f"l{seed}", "linear_probe", seed, 0.6)  # written before the check
    res = report(tmp_path, plot=False)
    conv = res["table"].set_index("strategy")["converged"]
    assert conv.to_dict() == {"scratch": "partial", "finetune": "all", "linear_probe": "unknown"}
    md = res["markdown"]
    assert "| scratch | 10 | 0.5000 ± 0.0000 † |" in md and "| finetune | 10 | 0.7000 ± 0.0000 |" in md
    # the finetune pair leans on a non-converged scratch cell: marked too
    assert "+0.2000 ± 0.0000 not significant: n too small for p < 0.05 † | 3/3 |" in md
    footnote = md.split("† Not converged (1 cell):")[1]
    assert f"- `{tmp_path / 's2'}` (scratch, seed 2): val_change=0.0310, loss_change=-0.2000" in footnote
    csv = pd.read_csv(tmp_path / "report" / "report.csv").set_index("strategy")
    assert csv["converged"].to_dict() == conv.to_dict()


def test_all_converged_cells_get_no_mark(tmp_path):
    for seed in (0, 1):
        fake_result(tmp_path / f"s{seed}", "scratch", seed, 0.5, extra=converge(True))
    md = report(tmp_path, plot=False)["markdown"]
    assert "†" not in md and "| all |" in md


def write_pairs(root, budget, diffs, scratch_base=0.5):
    for seed, d in enumerate(diffs):
        fake_result(root / f"s{budget}_{seed}", "scratch", seed, scratch_base + 0.1 * seed, budget)
        fake_result(root / f"f{budget}_{seed}", "finetune", seed, scratch_base + 0.1 * seed + d, budget)


def test_paired_statistics_pair_by_seed_within_each_budget(tmp_path):
    write_pairs(tmp_path, 10, DIFFS)
    write_pairs(tmp_path, 50, [0.1, 0.12, 0.08], scratch_base=0.7)  # CI [.050, .150] excludes 0, p .25
    fake_result(tmp_path / "f10_9", "finetune", 9, 0.99, 10)  # no scratch seed 9: unpaired
    res = report(tmp_path, plot=False)
    t = res["table"].set_index(["strategy", "target.data.samples_per_class"])
    b10, b50 = t.loc[("finetune", 10)], t.loc[("finetune", 50)]
    assert (b10["n"], b10["n_pairs"], b10["wins"]) == (5, 4, 3)
    assert b10["paired_diff_mean"] == pytest.approx(0.025)
    assert b10["paired_diff_ci95"] == pytest.approx(3.182446 * math.sqrt(0.0007) / 2, rel=1e-5)
    assert b10["p_value"] == pytest.approx(0.25) and not b10["significant"]
    assert (b50["n_pairs"], b50["wins"]) == (3, 3) and b50["paired_diff_mean"] == pytest.approx(0.1)
    assert not b50["significant"] and b50["p_value"] == pytest.approx(0.25)  # the CI alone is not enough
    assert t.loc[("scratch", 10), "n_pairs"] == 0  # the baseline is not paired with itself
    md = res["markdown"]
    assert "| +0.0250 ± 0.0421 not significant: n too small for p < 0.05 | 3/4 | 0.2500 |" in md
    assert "| +0.1000 ± 0.0497 not significant: n too small for p < 0.05 | 3/3 | 0.2500 |" in md
    assert "significant |" not in md.replace("not significant", "")  # never beside p = 0.25
    assert "two-sided Wilcoxon signed-rank test (scipy), exact p-value" in md
    assert "here the fewest pairs is 3 (smallest possible p 0.25)" in md
    csv = pd.read_csv(tmp_path / "report" / "report.csv")
    assert {"paired_diff_mean", "paired_diff_ci95", "wins", "n_pairs", "p_value", "converged"} <= set(csv)


def test_the_baseline_option_changes_what_is_paired(tmp_path, capsys):
    write_pairs(tmp_path, 10, DIFFS)
    for seed in range(4):
        fake_result(tmp_path / f"p{seed}", "linear_probe", seed, 0.5 + 0.1 * seed - 0.05, 10)
    t = report(tmp_path, plot=False, baseline="linear_probe")["table"].set_index("strategy")
    assert t.loc["scratch", "paired_diff_mean"] == pytest.approx(0.05) and t.loc["scratch", "wins"] == 4
    assert t.loc["finetune", "paired_diff_mean"] == pytest.approx(0.075)
    assert list(t.index)[0] == "linear_probe"  # the baseline reads first
    assert main([str(tmp_path), "--no-plots", "--baseline", "scrach"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--baseline scrach: no cell ran that strategy" in err


def test_a_logger_sweep_stays_one_group(tmp_path):
    # logger is in NON_RESULT_KEYS: it changes how a run is logged, never its result
    for seed, logger in enumerate(["csv", "tensorboard", "none"]):
        fake_result(tmp_path / f"s{seed}", "scratch", seed, 0.5, config={"logger": logger, "resume": seed > 0},
                    choices={"logger": logger})
    res = report(tmp_path, plot=False)
    assert res["keys"] == ["strategy", "target.data.samples_per_class"]
    assert res["table"]["n"].tolist() == [3]


COMPARISON = {"protocol": {"trials": 20, "objective": "val/acc", "direction": "maximize",
                           "tuning_seed": 100, "eval_seeds": [0, 1], "steps": 500, "val_per_class": 10,
                           "sampler": "TPESampler", "label_budget": 10},
              "strategies": {"finetune": {"best_params": {"target.optimizer.lr": 0.003,
                                                          "strategy.head_lr_mult": 10},
                                          "best_value": 0.8125, "trials": 20},
                             "scratch": {"best_params": {"target.optimizer.lr": 0.01},
                                         "best_value": 0.7, "trials": 20}}}


def test_comparison_json_renders_the_protocol_and_the_tuned_hyperparameters(tmp_path):
    write_pairs(tmp_path, 10, [0.1, 0.1])
    for trial in range(3):  # the tuning sweep's cells: tuning seed, not results
        fake_result(tmp_path / "tune" / str(trial), "finetune", 100, 0.9, 10,
                    choices={"hparams_search": "finetune"})
    (tmp_path / "comparison.json").write_text(json.dumps(COMPARISON))
    res = report(tmp_path, plot=False)
    md = res["markdown"]
    assert res["counts"] == {"ok": 4, "failed": 0, "incomplete": 0, "tuning": 3}
    assert "**Cells:** 4 ok, 0 failed, 0 incomplete; 3 tuning trials (not tabulated)." in md
    for line in ("## Protocol", "- Optuna trials per strategy: 20", "- sampler: TPESampler",
                 "- objective: val/acc", "- tuning seed: 100", "- evaluation seeds: [0, 1]",
                 "- target optimizer steps: 500", "- validation labels per class: 10"):
        assert line in md
    assert "untuned" not in md and (res["table"]["n"] == 2).all()
    assert ("| finetune | 10 | 0.6500 ± 0.0707 | `strategy.head_lr_mult=10`, `target.optimizer.lr=0.003` "
            "| 0.8125 | 20 |") in md
    assert "| scratch | 10 | 0.5500 ± 0.0707 | `target.optimizer.lr=0.01` | 0.7000 | 20 |" in md
    tuned = pd.read_csv(tmp_path / "report" / "report.csv").set_index("strategy")["tuned_params"]
    assert json.loads(tuned["finetune"]) == COMPARISON["strategies"]["finetune"]["best_params"]


def test_a_parent_of_several_comparisons_drops_their_tuning_trials(tmp_path):
    # two comparisons below one directory: no comparison.json at the top, the trials still are not results
    for cmp in ("a", "b"):
        write_pairs(tmp_path / cmp / "eval", 10, [0.1])
        (tmp_path / cmp / "comparison.json").write_text(json.dumps(COMPARISON))
        for trial in range(2):
            fake_result(tmp_path / cmp / "tune" / str(trial), "finetune", 100, 0.99, 10,
                        choices={"hparams_search": "finetune"})
    res = report(tmp_path, plot=False)
    assert res["counts"]["tuning"] == 4 and res["counts"]["ok"] == 4
    assert res["table"].set_index("strategy")["n"].to_dict() == {"scratch": 2, "finetune": 2}
    assert "0.99" not in res["markdown"]
    # a tuning sweep's own directory holds nothing else: reported as it is
    alone = report(tmp_path / "a" / "tune", plot=False)
    assert alone["counts"]["tuning"] == 0 and alone["table"]["n"].tolist() == [2]


def test_without_comparison_json_the_report_says_nothing_was_tuned(tmp_path):
    write_pairs(tmp_path, 10, [0.1])
    md = report(tmp_path, plot=False)["markdown"]
    assert "**Hyperparameters: untuned.**" in md and "## Protocol" not in md


@pytest.mark.parametrize("text, culprit", [("{not json", "not readable JSON"),
                                           ('{"protocol": {}}', "needs objects 'protocol' and 'strategies'"),
                                           ('{"protocol": {}, "strategies": {"lora": {}}}',
                                            "strategies.lora.best_params")])
def test_a_bad_comparison_json_exits_2_naming_it(tmp_path, capsys, text, culprit):
    write_pairs(tmp_path, 10, [0.1])
    (tmp_path / "comparison.json").write_text(text)
    assert main([str(tmp_path), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "comparison.json" in err and culprit in err


def test_effective_labels_from_a_scratch_curve_at_four_budgets(tmp_path):
    for budget, acc in ((5, 0.5), (10, 0.6), (20, 0.7), (40, 0.8)):
        for seed in (0, 1):
            fake_result(tmp_path / f"s{budget}_{seed}", "scratch", seed, acc, budget)
    for budget, acc in ((5, 0.65), (20, 0.9), (40, 0.8)):
        fake_result(tmp_path / f"f{budget}", "finetune", 0, acc, budget)
    res = report(tmp_path)
    eff = res["effective"].set_index("target.data.samples_per_class")
    assert eff.loc[5, "effective_labels"] == pytest.approx(math.sqrt(200)) and eff.loc[5, "bound"] == ""
    assert eff.loc[5, "labels_transferred"] == pytest.approx(math.sqrt(200) - 5)
    assert eff.loc[20, "bound"] == ">" and math.isnan(eff.loc[20, "labels_transferred"])
    assert eff.loc[40, "effective_labels"] == pytest.approx(40) and eff.loc[40, "multiplier"] == 1.0
    md = res["markdown"]
    assert "## Effective labels transferred (test/acc)" in md
    assert "| finetune | 5 | 0.6500 | 14.1 | 9.1 | 2.83 |" in md and "| finetune | 20 | 0.9000 | > 40 | — | — |" in md
    out = tmp_path / "report"
    assert len(pd.read_csv(out / "effective_labels.csv")) == 3
    assert (out / "effective_labels.png").read_bytes()[:4] == b"\x89PNG"


def test_no_effective_labels_below_three_scratch_budgets(tmp_path):
    write_pairs(tmp_path, 5, [0.1])
    write_pairs(tmp_path, 10, [0.1])
    res = report(tmp_path, plot=False)
    assert res["effective"] is None and "Effective labels" not in res["markdown"]


def test_the_baseline_fallback_ignores_only_source_keys(tmp_path):
    """Scratch trains no source, so a group with another source model still pairs with it; any
    other difference (here a top-level ``precision`` key) must not be absorbed into the gain."""
    runs = {"f32c": ("convnet", "32", 0.1), "f32l": ("lenet", "32", 0.05),
            "f16l": ("lenet", "bf16-mixed", 0.2)}  # finetune: source model, precision, gain
    for budget, acc in ((5, 0.5), (10, 0.6), (20, 0.7)):
        for seed in (0, 1, 2):
            run = {"seed": seed, "budget": budget}
            fake_result(tmp_path / f"s{budget}_{seed}", "scratch", acc=acc + 0.01 * seed,
                        config={"precision": "32"}, **run)  # scratch: convnet, 32 only
            for name, (model, precision, gain) in runs.items():
                fake_result(tmp_path / f"{name}{budget}_{seed}", "finetune", acc=acc + gain + 0.01 * seed,
                            model=model, config={"precision": precision}, **run)
    res = report(tmp_path, plot=False)
    assert {"source.model", "precision"} <= set(res["keys"])
    t = res["table"]
    t = t[t["strategy"] == "finetune"].set_index(["source.model", "precision", "target.data.samples_per_class"])
    for budget in (5, 10, 20):
        for model, precision, gain in runs.values():
            row = t.loc[(model, precision, budget)]
            if precision == "32":  # the same context, or only the source differs: paired
                assert row["n_pairs"] == 3 and row["paired_diff_mean"] == pytest.approx(gain)
                assert row["gain_vs_scratch"] == pytest.approx(gain)
            else:  # no bf16 scratch: nothing to compare with
                assert row["n_pairs"] == 0 and math.isnan(row["gain_vs_scratch"])
    assert set(res["effective"]["precision"]) == {"32"} and len(res["effective"]) == 6


def test_the_budget_key_is_defined_once():
    """One ``BUDGET`` (analysis/collect.py), imported wherever the report needs it."""
    root = Path(__file__).resolve().parents[1] / "transfer_lab"
    defined = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                     for node in ast.parse(p.read_text()).body
                     if isinstance(node, ast.Assign)
                     and any(getattr(t, "id", None) == "BUDGET" for t in node.targets))
    assert defined == ["analysis/collect.py"]


def comparison_part(root, strategy, diffs_from=0.5, trials=20, hashes=None):
    """One part of a comparison run in parts: its comparison.json (one strategy), eval cells, trials."""
    part = {"protocol": {**COMPARISON["protocol"], "trials": trials},
            "strategies": {strategy: COMPARISON["strategies"][strategy]}}
    root.mkdir(parents=True)
    (root / "comparison.json").write_text(json.dumps(part))
    for seed in range(3):
        digest = {"config_hash": (hashes or {}).get(seed, f"{strategy}{seed}")}
        fake_result(root / "eval" / strategy / f"seed_{seed}", strategy, seed, diffs_from + 0.1 * seed,
                    extra=digest)
    fake_result(root / "tune" / strategy / "trial_0", strategy, 100, 0.99,
                choices={"hparams_search": strategy})


def test_several_directories_are_one_report_of_a_comparison_run_in_parts(tmp_path, capsys):
    comparison_part(tmp_path / "a", "scratch")
    comparison_part(tmp_path / "b", "finetune", diffs_from=0.55)
    out = tmp_path / "both"
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--no-plots"]) == 0
    md = (out / "report.md").read_text()
    assert md.startswith(f"# Report: {tmp_path / 'a'}, {tmp_path / 'b'}\n")
    t = pd.read_csv(out / "report.csv").set_index("strategy")
    assert t["n"].to_dict() == {"scratch": 3, "finetune": 3}  # the tuning trials stay out
    # paired across the two directories, seed by seed
    assert t.loc["finetune", "n_pairs"] == 3 and t.loc["finetune", "paired_diff_mean"] == pytest.approx(0.05)
    assert "- Optuna trials per strategy: 20" in md and "`target.optimizer.lr=0.01` | 0.7000 | 20 |" in md
    assert json.loads(t.loc["finetune", "tuned_params"]) == COMPARISON["strategies"]["finetune"]["best_params"]
    assert "0.99" not in md


@pytest.mark.parametrize("case, culprit", [
    ("no --out", "2 directories: give --out"),
    ("other protocol", "protocol differs from"),
    ("untuned part", "a tuned and an untuned directory in one report"),
    ("same cell twice", "the same cell (same config) as one under"),
    ("nested", "inside"),
    ("same directory", "inside"),
])
def test_several_directories_that_do_not_make_one_table_exit_2_in_one_line(tmp_path, capsys, case, culprit):
    a, b = tmp_path / "a", tmp_path / "b"
    comparison_part(a, "scratch")
    if case == "untuned part":
        write_pairs(b, 10, [0.1])
    elif case == "nested":
        b = a / "eval"
    elif case == "same directory":
        b = a / "eval" / ".."  # the same directory, spelt otherwise
    else:  # "same cell twice": b's seed 1 cell has the config of a's seed 1 (copied directories)
        comparison_part(b, "finetune", trials=10 if case == "other protocol" else 20,
                        hashes={1: "scratch1"} if case == "same cell twice" else None)
    args = [str(a), str(b), "--no-plots"]
    assert main(args if case == "no --out" else [*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and culprit in err, err
    assert not (tmp_path / "out").exists() and not (a / "report").exists()  # nothing half-written
    if case == "other protocol":
        assert "in trials:" in err


def test_cells_sharing_a_config_inside_one_directory_are_not_refused(tmp_path):
    # e.g. vectorised and separate runs of one config (vectorize_seeds is not in the hash) under one
    # directory: not a copy; only a config found under two of the directories read is
    comparison_part(tmp_path / "a", "scratch", hashes={0: "same", 1: "same"})
    comparison_part(tmp_path / "b", "finetune", diffs_from=0.55)
    res = report([tmp_path / "a", tmp_path / "b"], out=tmp_path / "out", plot=False)
    assert res["table"].set_index("strategy")["n"].to_dict() == {"scratch": 3, "finetune": 3}
    assert set(res["comparison"]["strategies"]) == {"scratch", "finetune"}
