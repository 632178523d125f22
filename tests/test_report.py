"""The report: grouping by what varies except the seed, statistics, gain over scratch, problems."""

import json
import math

import pandas as pd
import pytest

from transfer_lab.report import ci95, main, report


def fake_result(path, strategy, seed, acc, budget=10, status="ok", extra=None, model="convnet",
                trainer=None):
    """A results.json as run.py writes it (only the fields the report reads, plus noise)."""
    cfg = {"seed": seed, "store_dir": f"/tmp/store{seed}",
           "strategy": {"_target_": f"transfer_lab.strategies.{strategy}.X"},
           "source": {"epochs": 2, "model": {"_target_": model}},
           "target": {"epochs": 5, "data": {"samples_per_class": budget, "classes": [5, 6]}},
           **({"trainer": trainer} if trainer is not None else {})}
    res = {"status": status, "strategy": strategy, "seed": seed, "config": cfg,
           "choices": {"strategy": strategy, "model@source.model": model, "task": None},
           "metrics": {"test/acc": acc}, "source": {"test/acc": 0.9},
           "params": {"trainable": 100 if strategy != "linear_probe" else 10, "total": 100},
           "timings": {"total_s": 2.0}, **(extra or {})}
    if status != "ok":
        res["error"] = "RuntimeError: boom"
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


def test_failed_and_incomplete_cells_are_listed_not_dropped(tmp_path, capsys):
    fake_result(tmp_path / "0", "scratch", 0, 0.5)
    fake_result(tmp_path / "1", "finetune", 0, 0.0, status="failed")
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a job killed before writing results.json
    main([str(tmp_path), "--out", str(tmp_path / "elsewhere"), "--no-plots"])
    printed = capsys.readouterr().out
    assert "| scratch |" in printed and "Failed or incomplete cells (2)" in printed
    assert "failed (RuntimeError: boom)" in printed and "incomplete (no results.json)" in printed
    assert (tmp_path / "elsewhere" / "report.md").exists() and not (tmp_path / "report").exists()


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


def test_ci_needs_two_seeds():
    assert math.isnan(ci95(float("nan"), 1)) and ci95(1.0, 100) == pytest.approx(0.196)


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
