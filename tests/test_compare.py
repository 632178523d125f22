"""Tuning search spaces (conf/hparams_search) and the one-command tuned comparison.

Local helpers (``compose_search``, ``FakeRunner``) live here, not in conftest.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution

from conftest import CONF, ROOT, STRATEGIES
from transfer_lab import compare as cmp
from transfer_lab.strategies.base import Strategy

SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
_ABSENT = object()


def compose_search(name: str, *overrides: str, conf: Path = CONF):
    with initialize_config_dir(str(conf), version_base="1.3"):
        return compose("train", overrides=[f"{cmp.search_key(conf)}={name}", *overrides],
                       return_hydra_config=True)


def space(cfg) -> dict:
    """``{key: optuna distribution}`` of a composed config's search space, as the sweeper parses it."""
    parser = OverridesParser.create()
    return {k: create_optuna_distribution_from_override(parser.parse_override(f"{k}={v}"))
            for k, v in cfg.hydra.sweeper.params.items()}


def missing_keys(cfg) -> list[str]:
    """Search-space keys that the composed run config does not have (a typo tunes nothing)."""
    return [k for k in cfg.hydra.sweeper.params if OmegaConf.select(cfg, k, default=_ABSENT) is _ABSENT]


def extremes(dist) -> list:
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    return [dist.low, dist.high]


def test_every_strategy_has_a_search_space():
    assert SEARCHES == STRATEGIES


@pytest.mark.parametrize("name", STRATEGIES)
def test_search_space_keys_exist_and_values_build_the_strategy(name):
    cfg = compose_search(name, "seed=7")  # hparams_search=<name> alone selects the strategy
    assert cfg.hydra.runtime.choices.strategy == name
    assert missing_keys(cfg) == []
    assert "target.optimizer.lr" in cfg.hydra.sweeper.params
    assert cfg.optimized_metric.startswith("val/") and cfg.hydra.sweeper.direction == "maximize"
    assert cfg.hydra.sweeper.sampler.seed == 7  # seeded by the tuning seed
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    for key, dist in space(cfg).items():
        assert "range(" not in str(cfg.hydra.sweeper.params[key])  # the sweeper reads its stop as inclusive
        for value in extremes(dist):  # every corner of the space is a value the strategy accepts
            trial = OmegaConf.create({"strategy": OmegaConf.to_container(cfg.strategy, resolve=True),
                                      "target": {"optimizer": OmegaConf.to_container(cfg.target.optimizer)}})
            OmegaConf.update(trial, key, value, force_add=False)
            assert isinstance(instantiate(trial.strategy), Strategy)


def test_a_typo_in_a_search_space_is_caught(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    path = conf / "hparams_search" / "l2sp.yaml"
    path.write_text(path.read_text().replace("strategy.alpha:", "strategy.alpah:"))
    assert missing_keys(compose_search("l2sp", conf=conf)) == ["strategy.alpah"]


BEST = {"scratch": {"target.optimizer.lr": 0.0031}, "linear_probe": {"target.optimizer.lr": 0.02}}


class FakeRunner:
    """Stands in for the subprocesses: a tuning command leaves what Hydra's Optuna sweeper leaves
    (one results.json per trial, optimization_results.yaml)."""

    def __init__(self, studies: bool = True, codes: dict[str, int] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.studies, self.codes = studies, codes or {}

    def __call__(self, cmd: list[str]) -> int:
        self.calls.append(cmd)
        args = dict(a.split("=", 1) for a in cmd if "=" in a)
        kind = "tune" if "hydra.sweeper.n_trials" in args else "eval" if "strategy" in args else "report"
        code = self.codes.get(kind, 0)
        if kind != "tune" or not self.studies:
            return code
        study, s = Path(args["hydra.sweep.dir"]), args["strategy"]
        for i in range(int(args["hydra.sweeper.n_trials"])):  # the last trial diverged
            (study / str(i)).mkdir(parents=True)
            status = "failed" if i == int(args["hydra.sweeper.n_trials"]) - 1 else "ok"
            (study / str(i) / "results.json").write_text(json.dumps({"status": status}))
        (study / "optimization_results.yaml").write_text(
            yaml.safe_dump({"name": "optuna", "best_params": BEST[s], "best_value": 0.8}))
        return code


def _run(tmp_path, *extra: str, runner: FakeRunner | None = None):
    runner = runner or FakeRunner()
    argv = ["experiment=quickstart", "strategies=[scratch,linear_probe]", "trials=3", "tuning_seed=0",
            "eval_seeds=[1,2]", f"dir={tmp_path}", *extra]
    return cmp.main(argv, runner), runner


def test_compare_tunes_then_retrains_the_best_with_the_eval_seeds(tmp_path):
    code, runner = _run(tmp_path, "target.epochs=5")
    assert code == 0
    tune_a, tune_b, eval_a, eval_b, report = runner.calls
    key = cmp.search_key(CONF)
    for cmd, s in ((tune_a, "scratch"), (tune_b, "linear_probe")):
        assert cmd[1:4] == ["-m", "transfer_lab.train", "-m"]
        assert {"experiment=quickstart", f"strategy={s}", f"{key}={s}", "hydra.sweeper.n_trials=3", "seed=0",
                f"hydra.sweep.dir={tmp_path / 'tune' / s}", "target.epochs=5",
                "hydra.sweep.subdir=trial_${hydra.job.num}"} <= set(cmd)
    assert {"strategy=scratch", "target.optimizer.lr=0.0031", "seed=1,2", "target.epochs=5",
            f"hydra.sweep.dir={tmp_path / 'eval' / 'scratch'}", "hydra.sweep.subdir=seed_${seed}"} <= set(eval_a)
    assert "target.optimizer.lr=0.02" in eval_b and not any("hparams_search" in a for a in eval_a)
    assert report[1:] == ["-m", "transfer_lab.report", str(tmp_path / "eval")]
    out = json.loads((tmp_path / "comparison.json").read_text())
    proto = out["protocol"]
    assert {k: proto[k] for k in ("trials", "objective", "direction", "tuning_seed", "eval_seeds", "sampler",
                                  "label_budget", "val_per_class")} == {
        "trials": 3, "objective": "val/acc", "direction": "maximize", "tuning_seed": 0, "eval_seeds": [1, 2],
        "sampler": "TPESampler", "label_budget": 10, "val_per_class": None}
    assert (proto["val_fraction"], proto["max_val_per_class"]) == (0.1, 100)  # the fraction rule, stated
    assert "steps" in proto
    assert out["strategies"]["scratch"] == {"best_params": BEST["scratch"], "best_value": 0.8, "trials": 3,
                                            "failed_trials": 1}


def test_validation_budget_tied_to_the_label_budget(tmp_path):
    code, runner = _run(tmp_path, "val_per_class=label")
    assert code == 0
    assert all("target.data.val_per_class=budget" in c for c in runner.calls[:4])
    assert json.loads((tmp_path / "comparison.json").read_text())["protocol"]["val_per_class"] == "budget"


def test_parallel_trials_use_the_joblib_launcher(tmp_path):
    code, runner = _run(tmp_path, "n_jobs=2", "report=false")
    assert code == 0 and len(runner.calls) == 4
    assert {"hydra/launcher=parallel", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"} <= set(runner.calls[0])


@pytest.mark.parametrize(("extra", "message"), [
    (["tuning_seed=1"], "tuning_seed=1 is also in eval_seeds"),
    (["strategies=[scratch,finetun]"], "finetun has no search space"),
    (["target.nonexistent_key=3"], "nonexistent_key"),
    (["experiment=nope"], "nope"),
    (["trials=0"], "trials=0"),
])
def test_bad_input_is_one_line_before_anything_runs(tmp_path, capsys, extra, message):
    code, runner = _run(tmp_path, *extra)
    err = capsys.readouterr().err
    assert code == 2 and runner.calls == [] and message in err and err.count("\n") == 1


def test_an_unfinished_study_names_its_file(tmp_path, capsys):
    code, runner = _run(tmp_path, runner=FakeRunner(studies=False))
    assert code == 2 and "optimization_results.yaml: missing" in capsys.readouterr().err
    assert len(runner.calls) == 2  # both studies ran, nothing was evaluated


def test_search_key_follows_the_defaults_list(tmp_path):
    (tmp_path / "train.yaml").write_text("defaults:\n  - _self_\n  - strategy: finetune\n")
    assert cmp.search_key(tmp_path) == "+hparams_search"  # not a default yet: append the group
    (tmp_path / "train.yaml").write_text("defaults:\n  - _self_\n  - hparams_search: null\n")
    assert cmp.search_key(tmp_path) == "hparams_search"


def test_a_study_with_a_failed_trial_counts_a_failed_cell_does_not_stop_the_report(tmp_path, capsys):
    # a tuning sweep with a diverged trial exits 1 but wrote its results: the comparison goes on;
    # a failed evaluation cell is reported, then the command exits 1 naming it
    code, runner = _run(tmp_path, runner=FakeRunner(codes={"tune": 1, "eval": 1}))
    assert code == 1 and len(runner.calls) == 5 and "failed: scratch, linear_probe" in capsys.readouterr().err
    assert (tmp_path / "comparison.json").is_file()


def test_override_values():
    assert [cmp.override_value(v) for v in (0.001, 3, True, None, "relu", "a b")] == [
        "0.001", "3", "true", "null", "relu", "'a b'"]


@pytest.mark.slow
@pytest.mark.skipif("optimized_metric" not in (CONF / "train.yaml").read_text(),
                    reason="needs the pipeline merge: conf/train.yaml's optimized_metric (main returns the "
                           "validation metric the sweeper optimises) and target.steps")
def test_compare_end_to_end_on_synthetic_data(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFER_LAB_STORE": str(tmp_path / "store")}
    tiny = ["data@source.data=synthetic", "data@target.data=synthetic", "model@source.model=tiny_cnn",
            "source.epochs=1", "target.steps=6", "target.val_check_interval=3", "trainer.accelerator=cpu",
            "logger=none"]
    cmd = [sys.executable, "-m", "transfer_lab.compare", "strategies=[scratch,linear_probe]", "trials=2",
           "tuning_seed=0", "eval_seeds=[1,2]", f"dir={tmp_path / 'cmp'}", *tiny]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    for s, r in out["strategies"].items():
        trials = [json.loads(p.read_text()) for p in (tmp_path / "cmp" / "tune" / s).rglob("results.json")]
        assert r["trials"] == len(trials) == 2
        # best_value is the best trial's validation metric, not a test one
        assert r["best_value"] == pytest.approx(max(t["metrics"]["val/acc"] for t in trials))
        cells = [json.loads(p.read_text()) for p in (tmp_path / "cmp" / "eval" / s).rglob("results.json")]
        assert sorted(c["seed"] for c in cells) == [1, 2]
        lr = r["best_params"]["target.optimizer.lr"]
        assert all(c["config"]["target"]["optimizer"]["lr"] == pytest.approx(lr) for c in cells)


def test_the_report_on_dir_eval_finds_comparison_json_in_dir(tmp_path):
    """The tool writes ``D/comparison.json`` and evaluates into ``D/eval``; the report runs on the
    latter (as the tool does) and must still state the protocol."""
    from transfer_lab.analysis.comparison import read_comparison

    data = {"protocol": {"trials": 2}, "strategies": {"scratch": {"best_params": {"target.optimizer.lr": 0.01}}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "comparison.json").write_text(json.dumps(data))
    assert read_comparison(tmp_path / "eval") == data == read_comparison(tmp_path)
    assert read_comparison(tmp_path / "eval" / "scratch") is None  # only one level up


def test_eval_budgets_retrain_the_tuned_configuration_at_every_budget(tmp_path):
    # tuned once at the run's budget (the tuning command keeps it), evaluated at each listed budget
    code, runner = _run(tmp_path, "eval_budgets=[5,50]", "target.data.samples_per_class=10", "report=false")
    assert code == 0
    tune_a, _, eval_a, eval_b = runner.calls
    assert "target.data.samples_per_class=10" in tune_a
    for cmd in (eval_a, eval_b):
        budgets = [a for a in cmd if a.startswith("target.data.samples_per_class=")]
        assert budgets == ["target.data.samples_per_class=5,50"]  # the sweep's, not the tuned one
        assert "seed=1,2" in cmd and "hydra.sweep.subdir=spc${target.data.samples_per_class}_seed_${seed}" in cmd
    assert "target.optimizer.lr=0.0031" in eval_a and "target.optimizer.lr=0.02" in eval_b
    out = json.loads((tmp_path / "comparison.json").read_text())
    assert (out["protocol"]["label_budget"], out["protocol"]["eval_budgets"]) == (10, [5, 50])
    assert "target.data.samples_per_class=5,50" in out["commands"]["scratch"]["eval"]


def test_without_eval_budgets_only_the_tuned_budget_is_evaluated(tmp_path):
    code, runner = _run(tmp_path, "report=false")
    assert code == 0
    assert not any(a.startswith("target.data.samples_per_class") for a in runner.calls[2])
    assert json.loads((tmp_path / "comparison.json").read_text())["protocol"]["eval_budgets"] == [10]


@pytest.mark.parametrize(("value", "message"), [
    ("[5,5]", "listed twice"), ("[0,10]", "0 is not a label budget"), ("[ten]", "'ten' is not a label budget"),
    ("[]", "non-empty list"),
])
def test_bad_eval_budgets_are_one_line_before_anything_runs(tmp_path, capsys, value, message):
    code, runner = _run(tmp_path, f"eval_budgets={value}")
    err = capsys.readouterr().err
    assert code == 2 and runner.calls == [] and message in err and err.count("\n") == 1


def test_a_key_the_preset_sweeps_is_fixed_not_tuned(tmp_path):
    # label_budget sweeps target.data.samples_per_class in its hydra.sweeper.params: the Optuna
    # sweeper would search it beside the strategy's space, so every run fixes it at the preset's value
    runner = FakeRunner()
    argv = ["experiment=label_budget", "strategies=[scratch]", "trials=2", "tuning_seed=100", "eval_seeds=[0,1]",
            f"dir={tmp_path}", "report=false"]
    assert cmp.main(argv, runner) == 0
    tune, evaluate = runner.calls
    assert "target.data.samples_per_class=10" in tune and "target.data.samples_per_class=10" in evaluate
    argv[-1:] = ["report=false", "target.data.samples_per_class=50"]  # the command line wins
    shutil.rmtree(tmp_path / "tune")
    runner = FakeRunner()
    assert cmp.main(argv, runner) == 0
    assert [a for a in runner.calls[0] if a.startswith("target.data.samples_per_class")] == [
        "target.data.samples_per_class=50"]
