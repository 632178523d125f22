"""Shared test helpers: compose the real Hydra config with tiny, offline settings, and the
fixtures several test files need (``one_thread``, ``synth``, ``pair``, ``train_steps``).

Tiers: ``pytest -m "not slow"`` is the everyday fast tier; CI runs everything.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from transfer_lab.models import convnet, mlp, resnet_cifar

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# the real data arrays: $TRANSFER_LAB_DATA, else data/ inside the repository (as conf/train.yaml)
SHARED_DATA = Path(os.environ.get("TRANSFER_LAB_DATA", ROOT / "data"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))

# tiny, offline, CPU: synthetic data, a small CNN, two epochs per stage
TINY = ["data@source.data=synthetic", "data@target.data=synthetic", "model@source.model=tiny_cnn",
        "source.epochs=2", "target.epochs=2", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false"]


def compose_cfg(*overrides: str, store: Path | str | None = None, tiny: bool = True) -> DictConfig:
    """The config ``python -m transfer_lab.train <overrides>`` would run (Hydra's compose API)."""
    extra = list(TINY) if tiny else []
    if store is not None:
        extra.append(f"store_dir={store}")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*extra, *overrides])


def needs_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (set TRANSFER_LAB_DATA to the directory of the data arrays)")
    return path


# --- fixtures --------------------------------------------------------------------------------
@pytest.fixture
def one_thread():
    """Tiny tensors: on a shared CPU, intra-op threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def synth():
    """``synth(**kw)``: a prepared ``SyntheticData``; ``kw`` override small defaults."""
    from transfer_lab.data import SyntheticData

    def make(**kw: Any):
        base = dict(num_classes=4, shape=(1, 12, 12), n_train=40, n_test=16)
        return SyntheticData(**{**base, **kw}).prepare()

    return make


ARCHS = {  # (factory(num_classes), input shape): CNN with BatchNorm, MLP with BatchNorm, ResNet
    "convnet": (lambda k: convnet(1, 12, k, channels=[4, 8]), (1, 12, 12)),
    "mlp": (lambda k: mlp(1, 8, k, hidden=[16, 12], batch_norm=True), (1, 8, 8)),
    "resnet": (lambda k: resnet_cifar(3, 8, k, depth=8, width=4), (3, 8, 8)),
}


class Pair(NamedTuple):
    source: torch.nn.Module
    target: torch.nn.Module
    shape: tuple[int, int, int]


@pytest.fixture
def pair():
    """``pair(arch="convnet", num_classes=3)``: a 4-class source (seed 0, BatchNorm buffers moved
    off their fresh values so a copy is visible) and a fresh target (seed 1) of ``arch``."""
    def make(arch: str = "convnet", num_classes: int = 3) -> Pair:
        build, shape = ARCHS[arch]
        torch.manual_seed(0)
        src = build(4)
        for m in src.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.add_(0.3)
                m.running_var.mul_(1.5)
        torch.manual_seed(1)
        return Pair(src, build(num_classes), shape)

    return make


class Trained(NamedTuple):
    module: Any
    got_grad: set[str]  # parameter names that received a gradient tensor
    nonzero_grad: set[str]  # ... whose gradient was non-zero at least once


@pytest.fixture
def train_steps():
    """``train_steps(model, strategy, shape=(1, 12, 12), steps=2, batches=None, lr=0.1)``: a few
    SGD steps through a ``TransferModule``'s own optimizer (3 classes); ``batches()`` supplies a
    batch, else random ones of ``shape``."""
    from transfer_lab.module import TransferModule

    def run(model, strategy, shape=(1, 12, 12), steps: int = 2, batches=None, lr: float = 0.1) -> Trained:
        module = TransferModule(model, strategy, lambda g: torch.optim.SGD(g, lr=lr), lr=lr, num_classes=3)
        module.train()
        opt = module.configure_optimizers()
        got, nonzero = set(), set()
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            b = batches() if batches else (torch.randn(16, *shape), torch.randint(0, 3, (16,)))
            strategy.training_loss(module, b).backward()
            opt.step()
            got |= {n for n, p in model.named_parameters() if p.grad is not None}
            nonzero |= {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
        return Trained(module, got, nonzero)

    return run
