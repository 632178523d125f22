"""Images/s of K seeds trained as one vectorised model vs the same K seeds trained one after the
other (``TransferModule`` + ``Trainer``), on the same images, in one process.

``transfer_lab.bench`` calls ``seeds_throughput``; nothing here runs on import.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial

import lightning as L
import torch

from transfer_lab.data import SyntheticData
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.models.backbones import convnet, mlp
from transfer_lab.module import TransferModule
from transfer_lab.strategies.scratch import Scratch
from transfer_lab.vectorized.engine import fit_seeds
from transfer_lab.vectorized.modes import resolve_mode

#: the issue's two models: an overhead-bound MLP 784-16-10 and the bench's convnet
MODELS: dict[str, Callable] = {
    "mlp": lambda dm: mlp(dm.input_shape[0], dm.input_shape[-1], dm.num_classes, hidden=(16,)),
    "convnet": lambda dm: convnet(dm.input_shape[0], dm.input_shape[-1], dm.num_classes),
}


def synthetic_mnist(seed: int, n_per_class: int = 200, batch_size: int = 64) -> TransferDataModule:
    """MNIST-shaped synthetic data (10 classes, 1×28×28): no files needed."""
    return SyntheticData(num_classes=10, shape=(1, 28, 28), n_train=n_per_class, n_test=10,
                         batch_size=batch_size, seed=seed, val_fraction=0.0).prepare()


def _trainer(epochs: int, device: str) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator=device, devices=1, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     num_sanity_val_steps=0, limit_val_batches=0)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_vectorised(model: str, dms: list[TransferDataModule], epochs: int, device: str,
                    clock: Callable[[], float] = time.perf_counter) -> float:
    L.seed_everything(0, verbose=False)
    models = [MODELS[model](dm) for dm in dms]
    trainer = _trainer(epochs, device)
    t0 = clock()
    fit_seeds(models, [Scratch() for _ in dms], dms, partial(torch.optim.Adam, lr=1e-3), 1e-3,
              trainer, test=False)
    _sync(device)
    return clock() - t0


def time_separate(model: str, dms: list[TransferDataModule], epochs: int, device: str,
                  clock: Callable[[], float] = time.perf_counter) -> float:
    total = 0.0
    for dm in dms:
        L.seed_everything(0, verbose=False)
        module = TransferModule(MODELS[model](dm), Scratch(), partial(torch.optim.Adam, lr=1e-3),
                                lr=1e-3, num_classes=dm.num_classes)
        trainer = _trainer(epochs, device)
        t0 = clock()
        trainer.fit(module, datamodule=dm)
        _sync(device)
        total += clock() - t0
    return total


def seeds_throughput(model: str = "mlp", ks: tuple[int, ...] = (1, 4, 8, 16), epochs: int = 2,
                     device: str = "cpu", repeats: int = 3,
                     data: Callable[[int], TransferDataModule] = synthetic_mnist,
                     clock: Callable[[], float] = time.perf_counter) -> dict:
    """``{K: {"vectorised_ips", "separate_ips", "speedup", "ratios", "mode"}}``: images/s medians over
    ``repeats``, and the median of the repetitions' paired ratios, each pair taken side by side in
    alternating order so a shared machine's load hits both sides alike. ``data(seed)`` gives seed k's
    prepared data module (default: MNIST-shaped synthetic images, batch 64); ``clock``: wall
    (``time.perf_counter``) or this process's CPU time (``time.process_time``). ``mode``: how the
    vectorised side ran its seeds (``vectorize_mode=auto`` on this device: ``vmap`` or ``loop``)."""
    out = {}
    for k in ks:
        dms = [data(seed) for seed in range(k)]
        images = sum(len(dm.y_train) for dm in dms) * epochs
        vec, sep = [], []
        for rep in range(repeats):  # alternate who goes first: the machine's load drifts
            sides = [lambda: vec.append(images / time_vectorised(model, dms, epochs, device, clock)),
                     lambda: sep.append(images / time_separate(model, dms, epochs, device, clock))]
            for side in sides if rep % 2 == 0 else sides[::-1]:
                side()
        mode = resolve_mode("auto", MODELS[model](dms[0]), torch.device(device), k)
        ratios = [a / b for a, b in zip(vec, sep)]  # each repetition's pair, taken side by side
        out[k] = {"vectorised_ips": round(statistics.median(vec), 1),
                  "separate_ips": round(statistics.median(sep), 1),
                  "speedup": round(statistics.median(ratios), 3), "ratios": [round(r, 3) for r in ratios],
                  "mode": mode}
    return out
