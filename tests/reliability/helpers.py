"""Helpers the reliability tests share; importable in child processes (``reliability.helpers``)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch

from transfer_lab.strategies.finetune import Finetune

KEY = "0123456789abcdef0123"


def state_digest(state: dict[str, torch.Tensor]) -> str:
    """One hash over names and bytes: equal digests mean identical weights."""
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def store_worker(root: str, log_dir: str, barrier=None, key: str = KEY) -> None:
    """One process asking the store for ``key``; a fake ``train`` records each call as a file."""
    from transfer_lab.store import SourceStore

    def train():
        Path(log_dir, f"train.{os.getpid()}").write_text("trained")
        time.sleep(0.5)  # widen the window in which the other processes ask too
        g = torch.Generator().manual_seed(os.getpid())  # a second training would differ
        return {"w": torch.randn(8, 4, generator=g)}, {"key": key}, {"acc": 1.0}

    if barrier is not None:
        barrier.wait()
    state, _, _, hit = SourceStore(root).get_or_create(key, train)
    Path(log_dir, f"loaded.{os.getpid()}").write_text(f"{state_digest(state)} {hit}")


class PickleBomb:
    """Unpickling this runs ``open(marker, 'w')``: a stand-in for arbitrary code execution."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_pickle_bomb(path: Path, marker: Path, wrap_state: bool = True) -> Path:
    """A ``.pt``/``.ckpt`` that looks like a checkpoint but creates ``marker`` when unpickled."""
    payload = {"state_dict": {"w": torch.zeros(2)}, "evil": PickleBomb(str(marker))}
    obj = payload if wrap_state else PickleBomb(str(marker))
    torch.save(obj, path)
    return path


class NaNLoss(Finetune):
    """Test-only strategy: finetune whose loss turns non-finite at ``at_step`` (a numerical fault)."""

    def __init__(self, at_step: int = 1) -> None:
        super().__init__()
        self.at_step = at_step
        self.steps = 0

    def loss(self, model, batch, task_loss):
        out = super().loss(model, batch, task_loss)
        self.steps += 1
        if self.steps > self.at_step:
            out.terms["nan"] = out.outputs.sum() * float("nan")
        return out


class SlowFinetune(Finetune):
    """Test-only finetune that sleeps ``sleep_s`` per training step, so a test can kill a run
    mid-epoch; the arithmetic is plain fine-tuning (same results as ``finetune``)."""

    def __init__(self, sleep_s: float = 0.0) -> None:
        super().__init__()
        self.sleep_s = sleep_s

    def loss(self, model, batch, task_loss):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return super().loss(model, batch, task_loss)
