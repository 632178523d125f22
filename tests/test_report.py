"""The report: grouping by what varies except the seed, statistics, gain over scratch, problems."""

import json
import math

import pandas as pd
import pytest

from transfer_lab.report import main, report


def fake_result(path, strategy, seed, acc, budget=10, status="ok", extra=None, model="convnet",
                trainer=None, metrics=None, source_data=None, config=None, choices=None):
    """A results.json as run.py writes it (only the fields the report reads, plus noise).
    ``metrics`` replaces ``{"test/acc": acc}``; ``source_data`` adds a source data choice;
    ``config`` / ``choices`` add top-level config keys / config-group choices."""
    cfg = {"seed": seed, "store_dir": f"/tmp/store{seed}",
           "strategy": {"_target_": f"transfer_lab.strategies.{strategy}.X"},
           "source": {"epochs": 2, "model": {"_target_": model},
                      **({"data": {"_target_": source_data}} if source_data else {})},
           "target": {"epochs": 5, "data": {"samples_per_class": budget, "classes": [5, 6]}},
           **({"trainer": trainer} if trainer is not None else {}), **(config or {})}
    choices = {"strategy": strategy, "model@source.model": model, "task": None,
               **({"data@source.data": source_data} if source_data else {}), **(choices or {})}
    res = {"status": status, "strategy": strategy, "seed": seed, "config": cfg, "choices": choices,
           "metrics": metrics or {"test/acc": acc}, "source": {"test/acc": 0.9},
           "params": {"trainable": 100 if strategy != "linear_probe" else 10, "total": 100},
           "timings": {"total_s": 2.0}, **(extra or {})}
    if status != "ok":
        res.update(error="RuntimeError: boom\n  a second line the report must not print", stage="target")
        del res["metrics"]
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(res))


def test_groups_by_strategy_and_budget_not_seed(tmp_path):
    accs = {("scratch", 5): [0.5, 0.6], ("finetune", 5): [0.7, 0.8], ("linear_probe", 5): [0.4, 0.5],
            ("scratch", 50): [0.8, 0.8], ("finetune", 50): [0.9, 0.92], ("linear_probe", 50): [0.7, 0.7]}
    i = 0
    for (strategy, budget), values in accs.items():
        for seed, acc in enumerate(values):
            # strategy_report / unknown keys from new strategies must not disturb anything
            fake_result(tmp_path / f"{i}_{strategy}", strategy, seed, acc, budget,
                        extra={"strategy_report": {"layers": [{"name": "a", "copied": True}]},
                               "something_new": {"x": [1, 2]}})
            i += 1
    res = report(tmp_path)
    t = res["table"]
    assert res["keys"] == ["strategy", "target.data.samples_per_class"]  # seed/store_dir excluded
    assert len(t) == 6 and (t["n"] == 2).all() and (t["seeds"] == "0,1").all()
    row = t[(t["strategy"] == "finetune") & (t["target.data.samples_per_class"] == 5)].iloc[0]
    assert row["acc_mean"] == pytest.approx(0.75) and row["acc_std"] == pytest.approx(0.0707107, 1e-5)
    assert row["acc_ci95"] == pytest.approx(12.706 * 0.0707107 / math.sqrt(2), 1e-4)
    assert row["gain_vs_scratch"] == pytest.approx(0.2) and not row["negative_transfer"]
    probe = t[(t["strategy"] == "linear_probe") & (t["target.data.samples_per_class"] == 50)].iloc[0]
    assert probe["gain_vs_scratch"] == pytest.approx(-0.1) and probe["negative_transfer"]
    assert probe["trainable"] == 10
    assert list(t["strategy"][:3]) == ["scratch", "finetune", "linear_probe"]  # baseline first
    out = tmp_path / "report"
    assert {p.name for p in out.iterdir()} == {"report.md", "report.csv", "acc_vs_budget.png",
                                               "bars_budget_5.png", "bars_budget_50.png"}
    csv = pd.read_csv(out / "report.csv")
    assert len(csv) == 6 and "gain_vs_scratch" in csv
    md = (out / "report.md").read_text()
    assert "0.7500 ± 0.0707" in md and "⚠ negative" in md
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in ("acc_vs_budget.png", "bars_budget_5.png"))


def test_failed_cells_are_counted_and_listed_apart_from_incomplete_ones(tmp_path, capsys):
    fake_result(tmp_path / "0", "scratch", 0, 0.5)
    fake_result(tmp_path / "1", "finetune", 0, 0.0, status="failed")
    source_nan = {"status": "failed", "stage": "source", "error": "FloatingPointError: non-finite loss"}
    (tmp_path / "3").mkdir()
    (tmp_path / "3" / "results.json").write_text(json.dumps(source_nan))
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a job killed before writing results.json
    fake_result(tmp_path / "4", "finetune", 1, 0.0, status="running")  # killed mid-run
    assert main([str(tmp_path), "--out", str(tmp_path / "elsewhere"), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("**Cells:** 1 ok, 2 failed, 2 incomplete.")
    assert "| scratch |" in printed and "Failed cells (2), not in the tables:" in printed
    assert f"`{tmp_path / '1'}`: failed in the target stage: RuntimeError: boom\n" in printed
    assert "a second line" not in printed
    assert f"`{tmp_path / '3'}`: failed in the source stage: FloatingPointError: non-finite loss" in printed
    incomplete = printed.split("Incomplete cells (2), not in the tables:")[1]
    assert "incomplete (no results.json)" in incomplete and "running (the run did not finish: no final results)" in incomplete
    assert ": failed" not in incomplete
    assert (tmp_path / "elsewhere" / "report.md").exists() and not (tmp_path / "report").exists()


def test_a_missing_directory_exits_2_with_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope: no such directory" in err


def test_a_varying_setting_becomes_a_column_and_gain_matches_it(tmp_path):
    for seed in (0, 1, 2):
        for model in ("convnet", "lenet"):
            fake_result(tmp_path / f"s{seed}{model}", "scratch", seed, 0.5, model=model)
            fake_result(tmp_path / f"f{seed}{model}", "finetune", seed,
                        0.6 if model == "convnet" else 0.45, model=model)
    res = report(tmp_path, plot=False)
    t = res["table"]
    # the choice column, not the redundant source.model._target_ it determines
    assert "source.model" in res["keys"] and "source.model._target_" not in res["keys"]
    assert len(t) == 4 and (t["n"] == 3).all()
    gains = t[t["strategy"] == "finetune"].set_index("source.model")["gain_vs_scratch"]
    assert gains["convnet"] == pytest.approx(0.1) and gains["lenet"] == pytest.approx(-0.05)


def test_a_key_missing_from_older_results_does_not_split_groups(tmp_path):
    # results written before a config key existed (trainer.callbacks) pool with the newer ones;
    # a null budget (all labels) is a value of its own
    fake_result(tmp_path / "a", "scratch", 0, 0.5, budget=None)
    fake_result(tmp_path / "b", "scratch", 1, 0.7, budget=None, trainer={"callbacks": []})
    fake_result(tmp_path / "c", "scratch", 0, 0.2, budget=5, trainer={"callbacks": []})
    res = report(tmp_path, plot=False)
    assert res["keys"] == ["strategy", "target.data.samples_per_class"]
    assert sorted(res["table"]["n"]) == [1, 2]
    assert "| scratch | all | 0.6000 ± 0.1414 | 2 |" in res["markdown"]


BASE_COLUMNS = ["strategy", "target.data.samples_per_class", "n", "seeds", "acc_mean", "acc_std",
                "acc_ci95", "source_acc", "trainable", "time_s", "converged", "gain_vs_scratch",
                "negative_transfer", "paired_diff_mean", "paired_diff_ci95", "wins", "n_pairs", "p_value",
                "significant", "p_method"]


def test_old_results_give_the_base_columns_only(tmp_path):
    for seed in (0, 1):
        fake_result(tmp_path / f"s{seed}", "scratch", seed, 0.5 + 0.1 * seed)
        fake_result(tmp_path / f"f{seed}", "finetune", seed, 0.7 + 0.1 * seed)
    res = report(tmp_path, plot=False)
    assert list(res["table"].columns) == [*BASE_COLUMNS, "_baseline_converged"]  # internal: not in the CSV
    assert list(pd.read_csv(tmp_path / "report" / "report.csv").columns) == BASE_COLUMNS
    assert res["per_class"] is None and res["ranking"] is None and not res["problems"]
    assert {p.name for p in (tmp_path / "report").iterdir()} == {"report.md", "report.csv"}
    assert res["markdown"].split("\n\n")[2].splitlines()[0] == (
        "| strategy | labels/class | test/acc mean ± std | n | seeds | 95% CI | gain vs scratch "
        "| paired diff vs scratch (95% CI) | wins | p (Wilcoxon) | source acc | trainable params | time (s) |")
    assert "Convergence: not recorded by these results" in res["markdown"]
    assert "Per-class" not in res["markdown"] and "Transferability" not in res["markdown"]


def test_balanced_and_per_class_accuracy_are_means_over_seeds(tmp_path):
    data = {"target": {"classes": [5, 6, 7]}}
    # scratch: per-class vectors per seed; class 7 absent from seed 1's test set (NaN: skipped)
    scratch = [(0.50, [1.0, 0.5, 0.0]), (0.75, [0.8, 0.7, float("nan")])]
    for seed, (bal, per) in enumerate(scratch):
        fake_result(tmp_path / f"s{seed}", "scratch", seed, 0.6, extra={
            "data": data, "per_class": {"test/acc": per},
            }, metrics={"test/acc": 0.6, "test/balanced_acc": bal})
    for seed, per in enumerate([[0.9, 0.9, 0.6], [0.7, 0.9, 0.8]]):
        fake_result(tmp_path / f"f{seed}", "finetune", seed, 0.8, extra={
            "data": data, "per_class": {"test/acc": per}},
            metrics={"test/acc": 0.8, "test/balanced_acc": sum(per) / 3})
    fake_result(tmp_path / "f2", "finetune", 2, 0.8)  # an older result: no balanced/per-class keys
    res = report(tmp_path, plot=False)
    t = res["table"].set_index("strategy")
    assert t.loc["scratch", "balanced_acc_mean"] == pytest.approx(0.625)
    assert t.loc["scratch", "balanced_acc_std"] == pytest.approx(0.25 / math.sqrt(2))
    assert t.loc["finetune", "n"] == 3  # the older seed still counts for acc ...
    assert t.loc["finetune", "balanced_acc_mean"] == pytest.approx((2.4 + 2.4) / 6)  # ... not here
    per = pd.read_csv(tmp_path / "report" / "per_class.csv").set_index("strategy")
    assert list(per.columns) == ["target.data.samples_per_class", "n", "class 5", "class 6", "class 7"]
    assert per.loc["scratch", ["class 5", "class 6", "class 7"]].tolist() == pytest.approx([0.9, 0.6, 0.0])
    assert per.loc["finetune", ["class 5", "class 6", "class 7"]].tolist() == pytest.approx([0.8, 0.9, 0.7])
    assert per.loc["finetune", "n"] == 2
    md = res["markdown"]
    assert "| scratch | 10 | 0.6000 ± 0.0000 | 2 | 0,1 | ± 0.0000 | 0.6250 ± 0.1768 |" in md
    assert "## Per-class test accuracy (mean over seeds)" in md
    assert "| strategy | labels/class | n | class 5 | class 6 | class 7 |" in md
    assert "| scratch | 10 | 2 | 0.9000 | 0.6000 | 0.0000 |" in md


# 4 sources (source model × source data) → (acc, logme, leep) per seed 0, 1
SOURCES = {("lenet", "mnist"): [(0.90, 3.0, -0.5), (0.92, 3.2, -0.7)],
           ("lenet", "usps"): [(0.80, 2.0, -0.4), (0.84, 2.2, -0.4)],
           ("mlp", "mnist"): [(0.70, 1.0, -0.9), (0.70, 1.4, -0.9)],
           ("mlp", "usps"): [(0.60, 0.5, -0.8), (0.58, 0.1, -1.0)]}


def write_sources(root, sources, budget=10):
    for (model, data), per_seed in sources.items():
        for seed, (acc, logme, leep) in enumerate(per_seed):
            fake_result(root / f"{model}_{data}_{budget}_{seed}", "finetune", seed, acc, budget,
                        model=model, source_data=data,
                        extra={"transferability": {"logme": logme, "leep": leep, "n": 50}})


def test_transferability_ranking_has_kendall_tau_per_setting(tmp_path):
    write_sources(tmp_path, SOURCES)
    # budget 50: LogME reverses the accuracy order, LEEP agrees with it
    write_sources(tmp_path, {k: [(a, -lm, -lp) for a, lm, lp in v] for k, v in SOURCES.items()}, 50)
    for seed in (0, 1):  # a scratch baseline has no source and no scores: not a ranked source
        fake_result(tmp_path / f"scratch{seed}", "scratch", seed, 0.5, model="lenet", source_data="mnist")
    res = report(tmp_path, plot=False)
    r = res["ranking"]
    b10 = r[r["target.data.samples_per_class"] == 10]
    # seed means: acc .91 .82 .70 .59; LogME 3.1 2.1 1.2 .3 (same order); LEEP -.6 -.4 -.9 -.9
    assert list(b10["source"]) == ["model=lenet, data=mnist", "model=lenet, data=usps",
                                   "model=mlp, data=mnist", "model=mlp, data=usps"]
    assert b10["acc"].tolist() == pytest.approx([0.91, 0.82, 0.70, 0.59])
    assert b10["logme"].tolist() == pytest.approx([3.1, 2.1, 1.2, 0.3])
    assert b10["leep"].tolist() == pytest.approx([-0.6, -0.4, -0.9, -0.9])
    assert (b10["n_sources"] == 4).all() and (b10["n"] == 2).all()
    assert b10["tau_logme"].iloc[0] == pytest.approx(1.0)
    # LEEP: pair (1,2) discordant, (3,4) tied in LEEP → τ-b = (4 - 1) / sqrt(6 * 5)
    assert b10["tau_leep"].iloc[0] == pytest.approx(3 / math.sqrt(30))
    b50 = r[r["target.data.samples_per_class"] == 50]
    assert b50["tau_logme"].iloc[0] == pytest.approx(-1.0)
    assert b50["tau_leep"].iloc[0] == pytest.approx(-3 / math.sqrt(30))
    md = res["markdown"]
    assert "## Transferability ranking (test/acc)" in md
    assert "### strategy=finetune, labels/class=10: 4 sources" in md
    assert "| model=lenet, data=usps | 2 | 2.1000 | -0.4000 | 0.8200 |" in md
    assert "Kendall's τ(LogME, test/acc) = 1.00; τ(LEEP, test/acc) = 0.55 over 4 sources." in md
    assert "Kendall's τ(LogME, test/acc) = -1.00" in md
    # the main table carries the score means as columns; scratch has none
    t = res["table"]
    row = t[(t["strategy"] == "finetune") & (t["source.model"] == "mlp") & (t["source.data"] == "usps")
            & (t["target.data.samples_per_class"] == 10)].iloc[0]
    assert row["logme"] == pytest.approx(0.3) and row["leep"] == pytest.approx(-0.9)
    assert t[t["strategy"] == "scratch"]["logme"].isna().all()
    assert len(pd.read_csv(tmp_path / "report" / "ranking.csv")) == 8


def test_no_ranking_below_three_sources(tmp_path):
    write_sources(tmp_path, dict(list(SOURCES.items())[:2]))
    res = report(tmp_path, plot=False)
    assert res["ranking"] is None and "Transferability ranking" not in res["markdown"]
    assert not (tmp_path / "report" / "ranking.csv").exists()
    assert res["table"]["logme"].tolist() == pytest.approx([3.1, 2.1])  # still in the main table


def test_regression_results_get_an_r2_table(tmp_path):
    runs = {"scratch": [(0.50, 0.9), (0.60, 0.8)], "finetune": [(0.70, 0.6), (0.80, 0.4)]}
    for strategy, values in runs.items():
        for seed, (r2, rmse) in enumerate(values):
            fake_result(tmp_path / f"{strategy}{seed}", strategy, seed, None, metrics={
                "test/r2": r2, "test/rmse": rmse, "test/mse": rmse ** 2, "test/loss": rmse ** 2},
                extra={"source": {"test/r2": 0.95, "test/rmse": 0.2}})
    res = report(tmp_path)
    assert not res["problems"] and list(res["sections"]) == ["r2"]
    t = res["table"].set_index("strategy")
    assert "acc_mean" not in t and "balanced_acc_mean" not in t
    assert t.loc["finetune", "r2_mean"] == pytest.approx(0.75)
    assert t.loc["finetune", "r2_std"] == pytest.approx(0.0707107, 1e-5)
    assert t.loc["scratch", "rmse_mean"] == pytest.approx(0.85)
    assert t.loc["finetune", "gain_vs_scratch"] == pytest.approx(0.2)
    assert t.loc["finetune", "source_r2"] == pytest.approx(0.95)
    assert "| finetune | 10 | 0.7500 ± 0.0707 | 2 | 0,1 | ± 0.6353 | 0.5000 | 0.2000 | +0.2000 ± 0.0000 " \
        "not significant: n too small for p < 0.05 | 2/2 | 0.5000 | 0.9500 |" in res["markdown"]
    assert "| strategy | labels/class | test/r2 mean ± std |" in res["markdown"]
    assert {p.name for p in (tmp_path / "report").iterdir()} == {
        "report.md", "report.csv", "r2_vs_budget.png", "r2_bars_budget_10.png"}
    assert list(pd.read_csv(tmp_path / "report" / "report.csv")["r2_mean"]) == pytest.approx([0.55, 0.75])


def test_a_mixed_directory_gets_one_table_per_metric(tmp_path):
    fake_result(tmp_path / "c", "scratch", 0, 0.6)
    fake_result(tmp_path / "r", "scratch", 0, None, metrics={"test/r2": 0.3, "test/rmse": 1.0})
    res = report(tmp_path, plot=False)
    assert list(res["sections"]) == ["acc", "r2"] and not res["problems"]
    assert res["table"]["acc_mean"].tolist() == [0.6]  # the first section is classification
    assert res["sections"]["r2"]["table"]["r2_mean"].tolist() == [0.3]
    assert "## Classification: test/acc" in res["markdown"] and "## Regression: test/r2" in res["markdown"]
    assert pd.read_csv(tmp_path / "report" / "report_r2.csv")["rmse_mean"].tolist() == [1.0]


def test_per_class_table_is_named_by_image_folder_class_names(tmp_path):
    """An image folder's classes are its folder names (results.json data.target.class_names):
    the per-class table is headed by them, not by the remapped label indices."""
    data = {"target": {"classes": [0, 1], "class_names": ["frog", "ship"]}}
    for seed, per in enumerate([[0.9, 0.5], [0.7, 0.7]]):
        fake_result(tmp_path / f"f{seed}", "finetune", seed, 0.7, extra={
            "data": data, "per_class": {"test/acc": per}})
    res = report(tmp_path, plot=False)
    per = pd.read_csv(tmp_path / "report" / "per_class.csv").set_index("strategy")
    assert per.loc["finetune", ["class frog", "class ship"]].tolist() == pytest.approx([0.8, 0.6])
    assert "| strategy | labels/class | n | class frog | class ship |" in res["markdown"]


def test_a_one_bar_chart_keeps_its_title_inside_the_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from transfer_lab.analysis.report_plots import bar_figure

    one = pd.DataFrame({"strategy": ["finetune"], "series": ["finetune, strategy.imbalance=resample"],
                        "acc_mean": [0.8], "acc_std": [0.01], "negative_transfer": [False]})
    fig = bar_figure(one, "acc", "10")
    fig.tight_layout()
    fig.canvas.draw()
    title = fig.axes[0].title.get_window_extent(fig.canvas.get_renderer())
    frame = fig.bbox
    assert frame.x0 <= title.x0 and title.x1 <= frame.x1 and title.y1 <= frame.y1
    plt.close(fig)
