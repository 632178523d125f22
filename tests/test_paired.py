"""PairedData, the one data component of two-stream strategies: transforms once per stream, with
both loaders, sharded by rank (also under real 2-process DDP), resumable by ``set_epoch``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from paired_helpers import IdData, image_ids
from transfer_lab.data import SyntheticData
from transfer_lab.data.paired import PairedData
from transfer_lab.models import convnet
from transfer_lab.module import TransferModule
from transfer_lab.strategies.dann import DANN
from transfer_lab.strategies.multitask import MultiTask

HERE = Path(__file__).resolve().parent


def fake_trainer(rank: int = 0, world: int = 2) -> SimpleNamespace:
    """What the data modules read from a Trainer: rank, world size, device and mode."""
    return SimpleNamespace(global_rank=rank, world_size=world, training=True,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def paired(loader: str, rank: int = 0, world: int = 2, labels: bool = True,
           n_main: int = 48) -> PairedData:
    main, second = IdData(n=n_main, loader=loader), IdData(n=32, offset=1000, loader=loader)
    data = PairedData(main, second=second, second_labels=labels)
    data.trainer = fake_trainer(rank, world)
    data.setup("fit")
    return data


# --- each stream transformed once, by its own data module, with either loader ---------------------
class BatchStats(L.Callback):
    """The std of every training batch's main and second-stream images, after the transfer hooks."""

    def __init__(self) -> None:
        self.stds: list[tuple[float, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, _, other = batch
        xo = other[0] if isinstance(other, (tuple, list)) else other
        self.stds.append((float(x.std()), float(xo.std())))


LOADERS = [("memory", "memory"), ("torchvision", "torchvision"), ("memory", "torchvision"),
           ("torchvision", "memory")]


@pytest.mark.parametrize("target_loader, source_loader", LOADERS)
@pytest.mark.parametrize("strategy_cls", [MultiTask, DANN])
def test_two_stream_batches_are_normalised_once_with_either_loader(strategy_cls, target_loader,
                                                                   source_loader):
    """With loader=torchvision the batches arrive normalised; normalising again gave std ≈ 0.01.
    Two epochs: the paired loader's set_epoch runs on both kinds of stream."""
    torch.manual_seed(0)
    data = {"num_classes": 3, "shape": (1, 8, 8), "n_train": 8, "n_test": 2, "batch_size": 8,
            "val_fraction": 0.0}
    target = SyntheticData(loader=target_loader, data_seed=1, **data)
    source = SyntheticData(loader=source_loader, data_seed=2, **data)
    strategy = strategy_cls()
    model = strategy.build(convnet(1, 8, 3, channels=[4]), convnet(1, 8, 3, channels=[4]))
    module = TransferModule(model, strategy, torch.optim.SGD, lr=0.01, num_classes=3)
    stats = BatchStats()
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[*strategy.callbacks(), stats])
    trainer.fit(module, datamodule=strategy.datamodule(target, source))
    assert len(stats.stds) == 2 * 3  # 3 classes × 8 images in batches of 8, two epochs
    assert all(0.5 < s < 2.0 for pair in stats.stds for s in pair), stats.stds


# --- sharding by rank -----------------------------------------------------------------------------
def one_epoch_ids(data: PairedData) -> tuple[set[int], set[int]]:
    main, second = set(), set()
    for x, _, other in data.train_dataloader():
        main |= set(image_ids(x, data.main))
        xo = other[0] if isinstance(other, tuple) else other
        second |= set(image_ids(xo, data.second))
    return main, second


@pytest.mark.parametrize("loader", ["memory", "torchvision"])
def test_each_rank_trains_on_its_own_share_of_both_streams(loader):
    """Equal stream sizes: one epoch is one pass over each, split between the two ranks."""
    (m0, s0), (m1, s1) = (one_epoch_ids(paired(loader, r, n_main=32)) for r in (0, 1))
    assert m0.isdisjoint(m1) and m0 | m1 == set(range(32))
    assert s0.isdisjoint(s1) and s0 | s1 == set(range(1000, 1032))


@pytest.mark.parametrize("loader", ["memory", "torchvision"])
def test_an_unlabelled_second_stream_yields_images_alone(loader):
    x, y, other = next(iter(paired(loader, world=1, labels=False).train_dataloader()))
    assert isinstance(other, torch.Tensor) and other.shape[1:] == x.shape[1:]


# --- resume: set_epoch(e) gives the batches an uninterrupted run sees in epoch e ------------------
def flat_ids(data: PairedData, batch) -> list[int]:
    x, _, (xo, _) = batch
    return image_ids(x, data.main) + image_ids(xo, data.second)


@pytest.mark.parametrize("loader", ["memory", "torchvision"])
def test_paired_loader_resumes_at_the_uninterrupted_batches(loader):
    data = paired(loader, world=1)
    straight, epochs = data.train_dataloader(), []
    for e in range(3):
        straight.set_epoch(e)  # what TransferModule.on_train_epoch_start does every epoch
        epochs.append([flat_ids(data, b) for b in straight])
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    for e in (1, 2):
        resumed = paired(loader, world=1).train_dataloader()
        resumed.set_epoch(e)
        assert [flat_ids(data, b) for b in resumed] == epochs[e]


# --- real DDP: 2 gloo processes on the CPU ---------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("loader", ["memory", "torchvision"])
def test_dann_under_two_process_ddp_gives_each_rank_other_images(loader, tmp_path):
    """strategy=dann's data hook under DDP: source and target images are split between the ranks
    (the target-image loader used to give every rank the same images)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(HERE / "paired_ddp_probe.py"), str(tmp_path), loader],
                          capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for stream in ("source", "target"):
        a, b = set(seen[0][stream]), set(seen[1][stream])
        assert a and b and a.isdisjoint(b), stream
