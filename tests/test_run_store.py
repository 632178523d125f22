"""Store hit/miss, results.json schema, config overrides, bad input before training."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose_cfg
from transfer_lab.errors import ConfigError
from transfer_lab.run import run
from transfer_lab.store import SourceStore
from transfer_lab.package import export_package, import_package, load_state_dict

RESULT_KEYS = {"strategy", "seed", "metrics", "source", "timings", "params", "config", "env", "status"}


@pytest.mark.slow
def test_store_miss_then_hit_gives_identical_results(tmp_path):
    cfg = compose_cfg("strategy=finetune", store=tmp_path / "store")
    first = run(cfg, tmp_path / "a")
    second = run(cfg, tmp_path / "b")
    assert first["source"]["cache_hit"] is False and second["source"]["cache_hit"] is True
    assert first["source"]["key"] == second["source"]["key"]
    assert first["metrics"]["test/acc"] == second["metrics"]["test/acc"]
    assert RESULT_KEYS <= set(first)
    assert {"source_s", "target_s"} <= set(first["timings"])
    assert {"test/acc", "test/loss", "test/balanced_acc"} <= set(first["metrics"])
    # the last epoch's train/val figures survive trainer.test (which resets callback_metrics):
    # they equal the last rows of the target stage's CSV log
    import csv
    rows = list(csv.DictReader(open(tmp_path / "a" / "target" / "metrics.csv")))
    for key in ("val/acc", "val/loss", "train/acc", "train/loss"):
        last = [float(r[key]) for r in rows if r.get(key)][-1]
        assert first["metrics"][key] == pytest.approx(last, rel=1e-6), key
    assert "test/acc" in first["source"] and {"torch", "lightning"} <= set(first["env"])
    # a different seed is a different source
    other = run(compose_cfg("strategy=finetune", "seed=1", store=tmp_path / "store"), tmp_path / "c")
    assert other["source"]["key"] != first["source"]["key"] and other["source"]["cache_hit"] is False


@pytest.mark.slow
def test_incomplete_store_entry_is_retrained_not_loaded(tmp_path):
    cfg = compose_cfg("strategy=finetune", store=tmp_path / "store")
    key = run(cfg, tmp_path / "a")["source"]["key"]
    entry = SourceStore(tmp_path / "store").entry(key)
    (entry / "model.safetensors").write_bytes(b"truncated")
    assert not SourceStore(tmp_path / "store").is_valid(key)
    assert run(cfg, tmp_path / "b")["source"]["cache_hit"] is False
    assert SourceStore(tmp_path / "store").is_valid(key)


@pytest.mark.slow
def test_knowledge_package_round_trip_and_checkpoint_source(tmp_path):
    store = SourceStore(tmp_path / "store")
    cfg = compose_cfg("strategy=finetune", store=store.root)
    key = run(cfg, tmp_path / "a")["source"]["key"]
    pkg = export_package(store, key, tmp_path / "pkg.zip")
    other = SourceStore(tmp_path / "elsewhere")
    assert import_package(pkg, other) == key and other.is_valid(key)
    state, _, _ = store.load(key)
    for k, v in load_state_dict(pkg).items():
        assert torch.equal(v, state[k])
    res = run(compose_cfg("strategy=finetune", f"source.checkpoint={pkg}", store=tmp_path / "s2"),
              tmp_path / "b")
    assert res["source"]["checkpoint"] == str(pkg)
    assert not (tmp_path / "s2").exists()  # an external source trains nothing


def test_experiment_preset_and_command_line_precedence():
    cfg = compose_cfg("experiment=quickstart", "target.data.samples_per_class=3",
                      "model@source.model=lenet", tiny=False)
    assert cfg.target.data.samples_per_class == 3 and cfg.source.data.classes == [0, 1, 2, 3, 4]
    assert cfg.source.model._target_.endswith("lenet")
    cfg = compose_cfg("data@target.data=npz", "target.data.train_file=a.npz",
                      "target.data.test_file=b.npz", "model@target.model=mlp", "seed=4",
                      "store_dir=/tmp/x", tiny=False)
    assert cfg.target.data.train_file == "a.npz" and cfg.target.model._target_.endswith("mlp")
    assert cfg.seed == 4 and cfg.store_dir == "/tmp/x"


@pytest.mark.parametrize("override, match", [
    ("target.data.samples_per_class=1000", "target.data.samples_per_class=1000"),
    ("target.data.classes=[]", "target.data.classes=\\[\\]"),
    ("source.data.classes=[0,7]", "source.data.classes: \\[7\\] out of range"),
])
def test_bad_input_fails_before_training_and_writes_nothing(override, match, tmp_path):
    cfg = compose_cfg(override, store=tmp_path / "store")
    with pytest.raises(ConfigError, match=match):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())


@pytest.mark.slow
def test_cli_unknown_option_and_bad_value_give_one_line(tmp_path):
    env = {**os.environ, "TRANSFER_LAB_STORE": str(tmp_path / "store")}
    cmd = [sys.executable, "-m", "transfer_lab.train", f"hydra.run.dir={tmp_path}/run"]
    bad_strategy = subprocess.run(cmd + ["strategy=nope"], capture_output=True, text=True, env=env,
                                  cwd=ROOT)
    assert bad_strategy.returncode != 0
    assert "Could not find 'strategy/nope'" in bad_strategy.stderr and "finetune" in bad_strategy.stderr
    bad_budget = subprocess.run(cmd + ["data@source.data=synthetic", "data@target.data=synthetic",
                                       "target.data.samples_per_class=999"],
                                capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad_budget.returncode == 2
    lines = [ln for ln in bad_budget.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("error: target.data.samples_per_class=999")
    assert "Traceback" not in bad_budget.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_source_scheduler_is_part_of_the_store_key_and_anneals_the_source(tmp_path, monkeypatch, synth):
    """scheduler@source.scheduler=cosine trains a different source (its own store key; the default
    key is unchanged, so entries stored without the option stay valid) whose LR ends at ~0; the
    old string form (source.scheduler=cosine) is one line before training."""
    from transfer_lab.module import TransferModule
    from transfer_lab.source_stage import source_spec
    from transfer_lab.package import store_key

    seen = []
    original = TransferModule.on_train_end if hasattr(TransferModule, "on_train_end") else None

    def record(self):
        seen.append(self.optimizers().param_groups[0]["lr"])
        if original:
            original(self)

    monkeypatch.setattr(TransferModule, "on_train_end", record, raising=False)
    plain = run(compose_cfg("strategy=finetune", store=tmp_path / "s"), tmp_path / "a")
    cos = run(compose_cfg("strategy=finetune", "scheduler@source.scheduler=cosine", store=tmp_path / "s"),
              tmp_path / "b")
    assert cos["source"]["key"] != plain["source"]["key"] and cos["source"]["cache_hit"] is False
    # seen: [source lr, target lr] per run; the cosine source ends annealed, the plain one does not
    assert seen[0] == pytest.approx(1e-3) and seen[2] < 1e-9
    cfg = compose_cfg("strategy=finetune")
    dm = synth(shape=(1, 16, 16))
    spec = source_spec(cfg, dm)
    assert "scheduler" not in spec and store_key(spec) == store_key(source_spec(cfg, dm))
    with pytest.raises(ConfigError, match=r"source\.scheduler=cosine: .*scheduler@source\.scheduler=cosine"):
        run(compose_cfg("source.scheduler=cosine", store=tmp_path / "s"), tmp_path / "c")


def test_steps_replace_epochs_and_validation_runs_every_n_steps(tmp_path):
    import csv

    cfg = compose_cfg("strategy=finetune", "source.epochs=1", "target.epochs=1", "target.steps=7",
                      "target.val_check_interval=3", "target.data.batch_size=16", store=tmp_path / "store")
    res = run(cfg, tmp_path / "out")
    assert res["target_training"]["steps"] == 7 and res["target_training"]["epochs"] >= 1  # past epochs=1
    with open(tmp_path / "out" / "target" / "metrics.csv") as f:
        val_steps = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("val/acc")})
    assert val_steps == [2, 5]  # after optimizer steps 3 and 6 (Lightning logs the 0-based step)


def test_source_steps_enter_the_store_key_only_when_set(synth):
    from transfer_lab.source_stage import source_spec
    from transfer_lab.package import store_key

    dm = synth(shape=(1, 16, 16))
    plain = source_spec(compose_cfg(), dm)
    assert "steps" not in plain  # keys of entries trained by epochs stay what they were
    stepped = source_spec(compose_cfg("source.steps=50"), dm)
    assert stepped["steps"] == 50 and store_key(stepped) != store_key(plain)


@pytest.mark.parametrize("override, culprit", [
    ("target.steps=-1", "target.steps=-1"),
    ("target.val_check_interval=0", "target.val_check_interval=0"),
])
def test_bad_step_settings_are_one_line_before_training(tmp_path, override, culprit):
    cfg = compose_cfg(*override.split(), store=tmp_path / "store")
    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "store").exists()


def test_a_waiting_rank_stops_with_one_line_when_rank_0_failed_or_never_delivers(tmp_path, monkeypatch):
    import time

    from lightning.pytorch.utilities import rank_zero_only

    from transfer_lab.source_stage import SourceWaitTimeout, mark_failed, wait_for_entry

    store, key = SourceStore(tmp_path / "store"), "0123456789abcdef0123"
    t0 = time.monotonic()
    with pytest.raises(SourceWaitTimeout, match="no store entry .* after 0s"):
        wait_for_entry(store, key, poll_s=0.01, timeout_s=0.2)
    mark_failed(store, key, RuntimeError("disk full\nmore lines"))  # as rank 0 does when training fails
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    with pytest.raises(SourceWaitTimeout, match="rank 1: rank 0 failed to train source .*: RuntimeError: disk full$"):
        wait_for_entry(store, key, poll_s=0.01, timeout_s=60)
    assert time.monotonic() - t0 < 10  # neither wait ran to a long timeout
