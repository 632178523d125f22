"""Clear errors: each kind of bad input is one ``ConfigError`` line naming the key/value/path,
raised before anything trains (the store stays empty)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CONF, ROOT, STRATEGIES, compose_cfg
from transfer_lab.errors import ConfigError
from transfer_lab.models import convnet, mlp
from transfer_lab.run import run
from transfer_lab.strategies.finetune import Finetune
from transfer_lab.strategies.linear_probe import LinearProbe
from transfer_lab.strategies.partial import Partial
from transfer_lab.validate import check_leaf, preflight_build, validate_config

FAST = ("source.epochs=1", "target.epochs=1")


def fails_cleanly(tmp_path: Path, *overrides: str) -> str:
    """Run the config; it must raise one ConfigError line and leave the store empty."""
    cfg = compose_cfg(*FAST, *overrides, store=tmp_path / "store")
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "out")
    msg = str(e.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    store = tmp_path / "store"
    assert not store.exists() or not any(store.glob("*/manifest.json")), "a source trained first"
    return msg


# --- already checked before training ----------------------------------------------------------
@pytest.mark.parametrize("overrides, expect", [
    (["target.data.samples_per_class=1000"], "target.data.samples_per_class=1000"),
    (["target.data.classes=[0,9]"], "target.data.classes: [9] out of range"),
    (["source.data.classes=[-1]"], "source.data.classes: [-1] out of range"),
    (["target.data.imbalance_ratio=0.5"], "target.data.imbalance_ratio=0.5"),
    (["target.data.augment=rotate"], "target.data.augment='rotate': valid: none, crop, crop_flip"),
])
def test_impossible_values_fail_before_training(tmp_path, overrides, expect):
    assert expect in fails_cleanly(tmp_path, *overrides)


# --- rejected when Hydra composes, by the schema of the run's own keys (transfer_lab/config.py) ---
@pytest.mark.parametrize("override, expect", [
    ("target.save_weights=some", "expected one of [auto, trainable, full, none]"),
    ("seed=abc", "could not be converted to Integer"),
    ("target.epochs=abc", "could not be converted to Integer"),
    ("target.select=bestval", "expected one of [last, best_val]"),
])
def test_schema_rejects_bad_run_keys_in_one_line_at_composition(override, expect):
    from transfer_lab.train import check_overrides

    with pytest.raises(ConfigError) as e:
        check_overrides([override])
    assert override in str(e.value) and expect in str(e.value) and "\n" not in str(e.value)


def test_missing_data_with_download_off_names_the_path(tmp_path):
    msg = fails_cleanly(tmp_path, "data@target.data=mnist", f"target.data.root={tmp_path}/nodata",
                        "strategy=scratch")
    assert f"{tmp_path}/nodata/MNIST" in msg and "download=true" in msg
    msg = fails_cleanly(tmp_path, "data@target.data=npz", f"target.data.train_file={tmp_path}/x.npz",
                        f"target.data.test_file={tmp_path}/y.npz", "strategy=scratch")
    assert f"target.data.train_file={tmp_path}/x.npz: no such file" in msg


# --- the validator (what run.prepare should call first) ------------------------------------------
@pytest.mark.parametrize("overrides, expect", [
    (["target.data.samples_per_class=abc"], "target.data.samples_per_class='abc': expected int or null"),
    (["target.data.classes=3"], "target.data.classes=3: expected Sequence[int] or null"),
    (["strategy=partial", "strategy.blocks=x"], "strategy.blocks='x': expected int"),
    (["strategy=linear_probe", "strategy.train_bn=maybe"], "strategy.train_bn='maybe': expected bool"),
    (["target.optimizer.lr=-0.1"], "target.optimizer.lr=-0.1: must be a finite number > 0"),
    (["+strategy.blockz=2"], "strategy.blockz: unknown option for transfer_lab.strategies.finetune"),
    (["+target.data.foo=1"], "target.data.foo: unknown option"),
    (["+source.model.widht=3"], "source.model.widht: unknown option"),
    (["data@target.data=npz"], "target.data.train_file: missing value (???)"),
    (["+trainer.max_epoch=3"], "trainer.max_epoch: unknown option for lightning.Trainer"),
    (["+target.trainer.gradient_clip=1"], "target.trainer.gradient_clip: unknown option"),
    (["trainer.enable_model_summary=often"], "trainer.enable_model_summary='often': expected bool"),
    (["strategy._target_=transfer_lab.strategies.nope.Nope"], "strategy._target_='transfer_lab.strategies.nope.Nope': cannot be imported"),
])
def test_validator_names_key_and_value_in_one_line(overrides, expect):
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(*overrides))
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_unknown_option_lists_the_valid_ones():
    with pytest.raises(ConfigError, match=r"valid: .*blocks, freeze_transferred, layers, train_bn"):
        validate_config(compose_cfg("strategy=partial", "+strategy.block=2"))


@pytest.mark.parametrize("group, names", [
    ("strategy", STRATEGIES),
    ("model@source.model", sorted(p.stem for p in (CONF / "model").glob("*.yaml"))),
    ("data@target.data", sorted(p.stem for p in (CONF / "data").glob("*.yaml")
                                 if p.stem not in ("npz", "table", "image_folder") and not p.stem.startswith("_"))),
    ("optimizer@target.optimizer", sorted(p.stem for p in (CONF / "optimizer").glob("*.yaml"))),
    ("trainer", sorted(p.stem for p in (CONF / "trainer").glob("*.yaml"))),
])
def test_validator_accepts_every_shipped_option(group, names):
    """No false alarms: each YAML of each group passes (a failure names the bad key)."""
    for name in names:
        validate_config(compose_cfg(f"{group}={name}"))


def test_validator_accepts_every_experiment_preset():
    for p in sorted((CONF / "experiment").glob("*.yaml")):
        validate_config(compose_cfg(f"experiment={p.stem}", tiny=False))


def test_check_leaf_required_arguments():
    with pytest.raises(ConfigError, match="needs train_file, test_file"):
        check_leaf({"_target_": "transfer_lab.data.NpzData"}, "target.data", {"seed", "key"})


# --- strategy against the models it will meet -----------------------------------------------------
@pytest.mark.parametrize("strategy, src, tgt, match", [
    (Partial(blocks=None, layers=["backbone.nope*"]), convnet(1, 16, 4), convnet(1, 16, 4),
     "strategy.layers: 'backbone.nope\\*' matches no module"),
    (Partial(blocks=9), convnet(1, 16, 4), convnet(1, 16, 4), "strategy.blocks=9: the backbone has"),
    (Finetune(), convnet(1, 16, 4), mlp(1, 16, 4), "backbone.fc1.0.weight differs"),
    (Finetune(), convnet(1, 16, 4, channels=[8]), convnet(1, 16, 4, channels=[16]),
     r"backbone.conv1.0.weight differs \(target \(16, 1, 3, 3\), source \(8, 1, 3, 3\)\)"),
    (LinearProbe(), convnet(3, 16, 4), convnet(1, 16, 4), "backbone.conv1.0.weight differs"),
    (Finetune(), None, convnet(1, 16, 4), "needs a source model"),
])
def test_preflight_build_catches_incompatible_pairs(strategy, src, tgt, match):
    with pytest.raises(ConfigError, match=match) as e:
        preflight_build(strategy, src, tgt)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", STRATEGIES)
def test_preflight_build_accepts_every_shipped_strategy(name):
    """No false alarms: each strategy's default config builds from a same-architecture source."""
    from hydra.utils import instantiate

    from transfer_lab.builders import build_model

    cfg = compose_cfg(f"strategy={name}")
    strategy = instantiate(cfg.strategy)
    shape = dict(input_shape=(1, 16, 16), num_classes=4)
    source = build_model(cfg.source.model, **shape) if strategy.needs_source else None
    preflight_build(strategy, source, build_model(cfg.target.get("model") or cfg.source.model, **shape))


def test_preflight_build_leaves_strategy_and_models_untouched():
    src, tgt = convnet(1, 16, 4), convnet(1, 16, 4)
    before = {k: v.clone() for k, v in tgt.state_dict().items()}
    strategy = Partial(blocks=1)
    preflight_build(strategy, src, tgt)
    assert strategy.transferred == [] and all(p.requires_grad for p in tgt.parameters())
    assert all((before[k] == v).all() for k, v in tgt.state_dict().items())


# --- through run(): types, unknown keys, ??? and strategy/model mismatches fail before the source trains
@pytest.mark.parametrize("overrides, expect", [
    pytest.param(["target.data.samples_per_class=abc"], "samples_per_class='abc'"),
    pytest.param(["+strategy.blockz=2"], "strategy.blockz: unknown option"),
    pytest.param(["data@target.data=npz"], "target.data.train_file: missing value"),
    pytest.param(["strategy=partial", "strategy.blocks=null", "strategy.layers=[backbone.nope*]"],
                 "matches no module"),
    pytest.param(["strategy=finetune", "model@target.model=mlp"], "differs"),
    pytest.param(["strategy=linear_probe", "target.data.channels=3"], "differs"),
    # raised inside a constructor that Hydra instantiates: one line, not Hydra's wrapped trace
    pytest.param(["strategy=partial", "strategy.layers=[backbone.conv1]"],
                 "partial needs exactly one of strategy.blocks or strategy.layers"),
    pytest.param(["source.model.channels=[-4,8]"], "source.model.channels"),
])
def test_config_errors_through_run_fail_before_training(tmp_path, overrides, expect):
    assert expect in fails_cleanly(tmp_path, *overrides)


# --- the command line ---------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expect", [
    (["strategy=nope"], "strategy=nope: unknown option (Could not find 'strategy/nope'); valid: adapter,"),
    (["-m", "strategy=scratch,finetun"], "strategy=finetun: unknown option"),
    (["model@target.model=resnet9"], "model@target.model=resnet9: unknown option"),
    (["data@source.data=mnist5k", "target.foo=1"], "Could not override 'target.foo'"),
    (["seed=[1"], "seed=[1"),
])
def test_command_line_errors_are_one_line(args, expect):
    from transfer_lab.train import check_overrides

    with pytest.raises(ConfigError) as e:
        check_overrides(args)
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args", [
    ["strategy=lora", "model@target.model=convnet", "seed=3", "hydra.run.dir=x"],
    ["-m", "strategy=scratch,finetune", "seed=0,1", "hydra/launcher=parallel"],
    ["-m", "experiment=quickstart", "strategy=glob(*)"],
    ["strategy='finetune'", 'model@target.model="convnet"'],
    ["hydra.mode=MULTIRUN", "seed=0,1", "strategy=scratch,finetune"],
    ["-cd", "/elsewhere", "experiment=mine"],
    ["hydra.searchpath=[file:///elsewhere]", "experiment=mine"],
    ["seed=range(3)", "-m", "~logger", "target.model=null"],
])
def test_command_line_check_accepts_valid_commands(args):
    from transfer_lab.train import check_overrides

    check_overrides(args)


def test_cli_hydra_errors_name_the_option_and_the_choices(tmp_path):
    """Composition errors (unknown group option, key not in struct) exit 2 with one line naming
    the option and the valid choices, before anything is imported or trained."""
    env = {**os.environ, "TRANSFER_LAB_STORE": str(tmp_path / "store")}
    proc = subprocess.run([sys.executable, "-m", "transfer_lab.train", f"hydra.run.dir={tmp_path}/r",
                           "strategy=nope"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "Could not find 'strategy/nope'" in proc.stderr and "weight_transfer" in proc.stderr
    assert not (tmp_path / "store").exists()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: strategy=nope: unknown option")
