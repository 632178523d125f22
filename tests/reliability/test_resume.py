"""Resumability: a run killed with SIGKILL mid-training resumes from its last checkpoint and
finishes with the configured number of epochs; a damaged checkpoint is not trusted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, compose_cfg
from transfer_lab.run import run

EPOCHS = 5
ARGS = ["strategy._target_=reliability.helpers.SlowFinetune", "source.epochs=1",
        f"target.epochs={EPOCHS}", "target.save_weights=full"]


def _cli(tmp_path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "transfer_lab.train", f"hydra.run.dir={tmp_path / 'run'}",
            f"store_dir={tmp_path / 'store'}", *TINY, *ARGS, *extra]


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_last_checkpoint(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_cli(tmp_path, "+strategy.sleep_s=0.15"), cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while not ckpt.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch: the kill lands mid-training
    killed = first.poll() is None
    if killed:
        os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    log.close()
    assert killed, f"the run finished before it could be killed:\n{(tmp_path / 'first.log').read_text()[-2000:]}"
    assert ckpt.exists(), (tmp_path / "first.log").read_text()[-2000:]
    results = tmp_path / "run" / "results.json"
    assert not results.exists() or json.loads(results.read_text())["status"] != "ok"

    second = subprocess.run(_cli(tmp_path, "+strategy.sleep_s=0.15"), cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    res = json.loads(results.read_text())
    assert res["status"] == "ok" and res["source"]["cache_hit"] is True
    assert res["target_training"]["resumed_after_epoch"] is not None
    assert res["target_training"]["epochs"] == EPOCHS
    assert not ckpt.exists()  # the resume state is dropped once the weights are saved



@pytest.mark.slow
def test_resumed_run_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    from transfer_lab.module import TransferModule

    cfg = compose_cfg("strategy=finetune", "source.epochs=1", "target.epochs=4", store=tmp_path / "s")
    ref = run(cfg, tmp_path / "ref")
    original, crash = TransferModule.on_train_epoch_end, [True]

    def interrupted(self):
        original(self)
        if self.trainer.checkpoint_callback is not None and crash[0] and self.current_epoch == 1:
            raise KeyboardInterrupt  # killed during epoch 1: last.ckpt holds epoch 0

    monkeypatch.setattr(TransferModule, "on_train_epoch_end", interrupted)
    with pytest.raises(BaseException):
        run(cfg, tmp_path / "cell")
    crash[0] = False
    res = run(cfg, tmp_path / "cell")
    assert res["target_training"]["resumed_after_epoch"] == 0
    assert res["metrics"]["test/loss"] == ref["metrics"]["test/loss"]
    assert res["metrics"]["test/acc"] == ref["metrics"]["test/acc"]


def test_damaged_checkpoint_is_dropped_and_the_run_starts_over(tmp_path):
    """A last.ckpt cut short by the kill (it is written in place by Lightning) is not trusted."""
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    cfg = compose_cfg("strategy=finetune", "source.epochs=1", "target.epochs=2", store=tmp_path / "s")
    res = run(cfg, out)
    assert res["status"] == "ok" and res["target_training"]["resumed_after_epoch"] is None
    assert res["target_training"]["epochs"] == 2


@pytest.mark.parametrize("kind", ["multitask", "dann"])
def test_paired_loaders_resume_at_the_uninterrupted_batches(kind):
    """A resumed multitask/dann run rebuilds its loader and calls set_epoch(e): epoch e must hold
    the batches an uninterrupted run sees in epoch e (source and target cycles included)."""
    import torch

    from transfer_lab.data.loader import BatchLoader
    from transfer_lab.data.paired import PairedLoader

    def make():
        a = BatchLoader(torch.arange(70), torch.arange(70), 16, shuffle=True, seed=1)  # 5 batches
        b = BatchLoader(torch.arange(30) + 100, torch.arange(30), 16, shuffle=True, seed=2)  # 2
        return PairedLoader(a, b)

    def flat(batch):
        return torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(batch)]).tolist()

    straight, epochs = make(), []
    for e in range(4):
        straight.set_epoch(e)  # what TransferModule.on_train_epoch_start does every epoch
        epochs.append([flat(b) for b in straight])
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    for e in range(1, 4):
        resumed = make()
        resumed.set_epoch(e)
        assert [flat(b) for b in resumed] == epochs[e]


def test_a_failure_while_checkpointing_leaves_a_record_and_no_truncated_checkpoint(tmp_path, monkeypatch):
    """Disk full while Lightning writes ``last.ckpt``: the half-written file is removed (a later
    resume must not trip over it) and results.json says which stage failed."""
    import errno

    from lightning.pytorch.callbacks import ModelCheckpoint

    from transfer_lab.results import RunFailed

    def disk_full(self, trainer, filepath):
        os.makedirs(os.path.dirname(filepath), exist_ok=True)
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04 truncated")
        raise OSError(errno.ENOSPC, "No space left on device", filepath)

    monkeypatch.setattr(ModelCheckpoint, "_save_checkpoint", disk_full)
    cfg = compose_cfg("strategy=finetune", "source.epochs=1", "target.epochs=2", store=tmp_path / "store")
    with pytest.raises(RunFailed, match="^target stage failed: OSError: .*No space left on device"):
        run(cfg, tmp_path / "out")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (res["status"], res["stage"]) == ("failed", "target")
    assert not (tmp_path / "out" / "checkpoints" / "last.ckpt").exists()
