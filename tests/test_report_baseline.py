"""``--baseline KEY=VALUE``: pair against a value of any key the report groups by, not only a strategy."""

import pytest

from test_report import fake_result  # the results.json fabricator of the report tests
from transfer_lab.analysis.paired import baseline_contexts, is_baseline, parse_baseline
from transfer_lab.report import main, report

# accuracy per (strategy, remedy) at seed 0; seed s adds 0.1·s (the seed effect pairing removes)
BASE = {("scratch", "none"): 0.50, ("scratch", "reweight"): 0.56, ("scratch", "resample"): 0.47,
        ("finetune", "none"): 0.70, ("finetune", "reweight"): 0.72, ("finetune", "resample"): 0.79}


def write_remedies(root, seeds=(0, 1, 2, 3)):
    for (strategy, remedy), acc in BASE.items():
        for seed in seeds:
            # the remedy wobbles by seed too: 0, +.01, 0, +.01 (so the paired CI is finite)
            wobble = 0.01 * (seed % 2) if remedy != "none" else 0.0
            fake_result(root / f"{strategy}_{remedy}_{seed}", strategy, seed, acc + 0.1 * seed + wobble,
                        config={"strategy": {"_target_": f"transfer_lab.strategies.{strategy}.X",
                                             "remedy": remedy}})


def test_parse_and_match_a_baseline():
    assert parse_baseline("scratch") == ("strategy", "scratch")
    assert parse_baseline("strategy.remedy=none") == ("strategy.remedy", "none")
    assert is_baseline({"k:strategy.remedy": "none"}, "strategy.remedy=none")
    assert not is_baseline({"strategy.remedy": "reweight"}, "strategy.remedy=none")
    keys = ["k:strategy", "k:strategy.remedy", "k:source.model", "k:target.steps"]
    # a key=value baseline: everything else must match, the strategy included
    assert baseline_contexts(keys, "strategy.remedy") == [["k:strategy", "k:source.model", "k:target.steps"]]
    assert baseline_contexts(keys)[0] == ["k:source.model", "k:target.steps"]


def test_a_key_value_baseline_pairs_within_each_strategy(tmp_path):
    write_remedies(tmp_path)
    res = report(tmp_path, plot=False, baseline="strategy.remedy=none")
    assert "strategy.remedy" in res["keys"]
    t = res["table"].set_index(["strategy", "strategy.remedy"])
    for (strategy, remedy), acc in BASE.items():
        row = t.loc[(strategy, remedy)]
        if remedy == "none":  # a baseline group is not paired with itself
            assert row["n_pairs"] == 0
            continue
        # paired with the same strategy's remedy=none cells, seed by seed (never across strategies)
        assert row["n_pairs"] == 4
        assert row["paired_diff_mean"] == pytest.approx(acc - BASE[(strategy, "none")] + 0.005)
    assert t.loc[("finetune", "resample"), "wins"] == 4 and t.loc[("scratch", "resample"), "wins"] == 0
    md = res["markdown"]
    assert "paired diff vs strategy.remedy=none (95% CI)" in md
    assert md.count("(baseline)") == 2  # one baseline row per strategy


def test_a_baseline_on_a_key_or_value_not_there_is_one_line(tmp_path, capsys):
    write_remedies(tmp_path, seeds=(0, 1))
    assert main([str(tmp_path), "--no-plots", "--baseline", "strategy.remedy=nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no cell ran that strategy.remedy value" in err and "reweight" in err
    assert main([str(tmp_path), "--no-plots", "--baseline", "target.steps=800"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "target.steps is not a key the report groups by" in err
    assert "strategy.remedy" in err
    assert main([str(tmp_path), "--no-plots", "--baseline", "strategy=scratch"]) == 0  # = --baseline scratch
