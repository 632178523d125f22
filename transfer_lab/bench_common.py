"""What the parts of ``python -m transfer_lab.bench`` share: the clock, the datasets and models,
and the two contestants of (a), (f) and (g): a fit through transfer_lab and a hand-written loop."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from transfer_lab.builders import make_trainer
from transfer_lab.data import EmbeddedMNIST, NpzData, TransferDataModule
from transfer_lab.data.loader import random_crop
from transfer_lab.models import convnet, resnet_cifar
from transfer_lab.module import TransferModule
from transfer_lab.perf import ChannelsLast, Compile
from transfer_lab.strategies.scratch import Scratch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TRANSFER_LAB_DATA") or ROOT / "data")  # as conf/train.yaml's data_dir
AMP = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# what (a)-(c) and (g) time with; bench.main() picks it (see --clock) through set_clock
_clock: Callable[[], float] = time.perf_counter


def now() -> float:
    return _clock()


def set_clock(clock: Callable[[], float]) -> None:
    global _clock
    _clock = clock


# --- data and models ---------------------------------------------------------------------------
def datasets(per_class: int, seed: int = 0) -> dict[str, tuple[TransferDataModule, Callable]]:
    """MNIST-size for the small CNN, CIFAR-size for resnet_cifar (real arrays; mnist5k fallback)."""
    kw = dict(samples_per_class=per_class, seed=seed, batch_size=64)
    if (DATA / "mnist_train.npz").is_file():
        mnist = NpzData(str(DATA / "mnist_train.npz"), str(DATA / "mnist_test.npz"), **kw)
    else:
        mnist = EmbeddedMNIST(**{**kw, "samples_per_class": min(per_class, 360)})
    out = {"convnet/mnist": (mnist.prepare(), convnet)}
    if (DATA / "cifar10_jpeg_train20k.npz").is_file():
        cifar = NpzData(str(DATA / "cifar10_jpeg_train20k.npz"), str(DATA / "cifar10_jpeg_test.npz"),
                        hflip=True, augment="crop_flip", **{**kw, "samples_per_class": per_class // 4})
        out["resnet_cifar/cifar10"] = (cifar.prepare(), partial(resnet_cifar, depth=20))
    return out


def make_model(factory: Callable, dm: TransferDataModule) -> torch.nn.Module:
    torch.manual_seed(0)  # both contestants start from the same weights
    c, _, s = dm.input_shape
    return factory(in_channels=c, image_size=s, num_classes=dm.num_classes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the two contestants of (a), (f) and (g) ----------------------------------------------------
def framework_fit(cfg, dm: TransferDataModule, factory: Callable, out: Path, args) -> float:
    """Seconds for ``epochs`` epochs through TransferModule + Trainer (construction included)."""
    module = TransferModule(make_model(factory, dm), Scratch(), partial(torch.optim.Adam, lr=1e-3),
                            lr=1e-3, num_classes=dm.num_classes)
    t0 = now()
    extra = ([ChannelsLast()] if args.channels_last else []) + ([Compile()] if args.compile else [])
    trainer = make_trainer(cfg, "target", out, extra)
    trainer.fit(module, datamodule=dm)
    sync(trainer.strategy.root_device)
    return now() - t0


def loop_fit(dm: TransferDataModule, factory: Callable, device: torch.device, args) -> float:
    """The same work as a researcher's own loop: device-resident uint8, normalise, step."""
    model = make_model(factory, dm)
    t0 = now()
    model = model.to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if args.compile:
        model.compile()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    x_all, y_all = dm.x_train.to(device), dm.y_train.to(device)
    mean, std = dm.mean.to(device).view(1, -1, 1, 1), dm.std.to(device).view(1, -1, 1, 1)
    pad, flip = max(1, x_all.shape[-1] // 8), dm.augment == "crop_flip" and dm.allows_hflip()
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.epochs):
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        perm = torch.randperm(len(y_all), generator=gen).to(device)
        for idx in perm.split(dm.batch_size):
            x, y = x_all[idx], y_all[idx]
            if dm.augment != "none":  # the same batched kernels the data module uses
                x = random_crop(x, pad, flip=flip)
            x = ((x.float() / 255 - mean) / std).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=AMP.get(args.precision), enabled=args.precision in AMP):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * len(y)  # epoch metrics kept on the device, read once
            correct += (logits.argmax(1) == y).sum()
        _ = (loss_sum / len(y_all)).item(), (correct / len(y_all)).item()
    sync(device)
    return now() - t0


def framework_cfg(args, device: torch.device):
    """The project's trainer config (``--trainer``), no validation: the plain loop has none."""
    over = [f"trainer={args.trainer}", "trainer.enable_progress_bar=false", f"target.epochs={args.epochs}",
            f"trainer.precision={args.precision}", "+trainer.limit_val_batches=0",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=over)
