"""Hydra-native configuration: the run's schema, logger/callbacks groups, the data base, pairings."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import open_dict

from conftest import CONF, compose_cfg
from transfer_lab.builders import make_callbacks, make_loggers
from transfer_lab.errors import ConfigError
from transfer_lab.perf import ChannelsLast, Compile
from transfer_lab.train import check_overrides


@pytest.mark.parametrize("override, reason", [
    ("target.save_weights=some", "expected one of [auto, trainable, full, none]"),
    ("seed=abc", "could not be converted to Integer"),
    ("target.epoch=3", "Key 'epoch' not in 'TargetStage'"),
    ("source.steps=many", "could not be converted to Integer"),
])
def test_the_schema_rejects_a_wrong_type_choice_or_key_in_one_line(override, reason):
    with pytest.raises(ConfigError) as e:
        check_overrides([override])
    assert reason in str(e.value) and "\n" not in str(e.value)


def test_logger_group_builds_each_chosen_logger_under_the_stage(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    (csv,) = make_loggers(compose_cfg(), tmp_path, "target")
    assert isinstance(csv, CSVLogger) and Path(csv.log_dir) == tmp_path / "target"
    assert make_loggers(compose_cfg("logger=none"), tmp_path, "target") is False
    cfg = compose_cfg()
    with open_dict(cfg):
        cfg.logger = "wandb"  # not a group option (the command line stops that earlier)
    with pytest.raises(ConfigError, match="logger=wandb"):
        make_loggers(cfg, tmp_path, "target")


def test_callbacks_group_follows_the_trainer_preset_and_the_command_line_wins():
    kinds = lambda *o: [type(c) for c in make_callbacks(compose_cfg(*o))]  # noqa: E731
    assert kinds() == []
    assert kinds("trainer=cpu") == [ChannelsLast]
    assert kinds("trainer=fast", "trainer.accelerator=cpu") == [ChannelsLast, Compile]
    assert kinds("trainer=fast", "callbacks=none") == []


def test_data_yamls_share_one_base_and_it_is_not_an_option():
    for path in (CONF / "data").glob("*.yaml"):
        if path.name.startswith("_") or path.stem in ("table", "none"):  # not image data
            continue
        assert "  - _image" in path.read_text(), path
    assert len(compose_cfg("data@target.data=mnist5k").target.data) > 10  # the base's keys arrived
    with pytest.raises(ConfigError, match="valid: .*mnist5k") as e:
        check_overrides(["data@target.data=nope"])
    assert "_image" not in str(e.value)


def test_pairing_group_replaces_task_and_presets_use_it():
    cfg = compose_cfg("pairing=mnist_split", tiny=False)
    assert list(cfg.source.data.classes) == [0, 1, 2, 3, 4] and list(cfg.target.data.classes) == [5, 6, 7, 8, 9]
    assert not (CONF / "task").exists()
    assert "override /pairing:" in (CONF / "experiment" / "mnist_split.yaml").read_text()


def test_quickstart_rates_follow_the_strategy_and_one_command_line_rate_replaces_them_all():
    lr = lambda *o: compose_cfg("experiment=quickstart", *o).target.optimizer.lr  # noqa: E731
    rates = {s: lr(f"strategy={s}") for s in ("scratch", "finetune", "linear_probe", "l2sp")}
    assert rates["finetune"] != rates["linear_probe"]  # conf/per_strategy/quickstart_<strategy>.yaml
    assert rates["l2sp"] == 0.01  # no file for it: the preset's own rate
    assert compose_cfg("strategy=linear_probe").target.optimizer.lr == 0.001  # no preset: no file
    for s in rates:
        assert lr(f"strategy={s}", "target.optimizer.lr=0.005") == 0.005
    # a tuning sweep's value replaces it too (the sweeper passes the key as a command-line override)
    assert lr("strategy=linear_probe", "hparams_search=linear_probe", "target.optimizer.lr=0.004") == 0.004


def test_every_per_strategy_file_names_an_experiment_and_a_strategy():
    experiments = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    strategies = {p.stem for p in (CONF / "strategy").glob("*.yaml")}
    files = sorted((CONF / "per_strategy").glob("*.yaml"))
    assert files  # the quickstart uses the group
    for path in files:  # a misspelt name would never be selected: it must split into both
        splits = [(path.stem[:i], path.stem[i + 1:]) for i, c in enumerate(path.stem) if c == "_"]
        assert any(e in experiments and s in strategies for e, s in splits), path.name
