"""TransferDataModule: a dataset shaped into a transfer task, held in memory as uint8 tensors."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from transfer_lab.data.checks import (check_images, check_options, check_shapes, check_stats,
                                     check_test_labels)
from transfer_lab.data.loader import (BatchLoader, PILDataset, adapt_images, normalize, pil_loader,
                                     pil_transform, random_crop)
from transfer_lab.data.splits import split_indices
from transfer_lab.errors import ConfigError


class TransferDataModule(L.LightningDataModule):
    """Base class: subclasses only say where the arrays come from.

    Override ``load_arrays`` to return ``(x_train, y_train, x_test, y_test)`` as numpy arrays
    (``x`` uint8 ``N×H×W`` or ``N×H×W×C``; ``y`` int). Everything else — class subset and
    remapping, label budget, imbalance, validation split, grey↔RGB and resize, normalisation and
    augmentation — happens here, identically for every source.

    Args:
        classes: original labels to keep, remapped to ``0..k-1`` in the given order (None: all).
        samples_per_class: label budget per class, drawn stratified and seeded (None: all).
        imbalance_ratio: if set, class ``i`` keeps ``n_max · ratio^(-i/(k-1))`` images.
        imbalance_remedy: ``reweight`` (class-weighted loss), ``resample`` (class-balanced
            sampling) or ``augment`` (class-balanced sampling, and every image of a minority
            class — fewer training images than the largest class — randomly cropped (and
            flipped where allowed) each time it is drawn, so its repeats are not copies).
        val_fraction: share of each class's training pool held out for validation.
        max_val_per_class: cap on those validation images per class (monitoring only; keeps
            per-epoch validation cheap when the pool is large and the budget small).
        val_per_class: instead of ``val_fraction``/``max_val_per_class``: exactly this many
            validation images per class, or ``"budget"``: as many as ``samples_per_class`` (a
            few-shot study tuned on as many validation labels as it trains on). Drawn from the
            class's pool outside the labelled subset.
        channels, image_size: adapt images to this shape (None: native).
        augment: one of ``none``, ``crop``, ``crop_flip`` (batched, on device, training only).
        batch_size, eval_batch_size: loader batch sizes.
        mean, std: per-channel normalisation replacing the training pool's statistics (a
            pretrained model's own; one finite value per channel, std > 0).
        device_resident: move the tensors to the training device once (fast on GPU).
        loader: ``memory`` (uint8 batches sliced in memory, transformed as batched tensor ops on
            the device) or ``torchvision`` (the standard per-sample PIL ``Dataset`` +
            ``DataLoader``: same shaping, same normalisation and augmentation, much slower).
        num_workers: ``DataLoader`` worker processes for ``loader=torchvision``.
        seed: draws the validation split, the budget subset and the shuffling.
    """

    def __init__(self, classes: Sequence[int] | None = None, samples_per_class: int | None = None,
                 imbalance_ratio: float | None = None, imbalance_remedy: str | None = None,
                 val_fraction: float = 0.1, max_val_per_class: int | None = 100,
                 val_per_class: int | str | None = None, channels: int | None = None,
                 image_size: int | None = None, augment: str = "none", batch_size: int = 64,
                 eval_batch_size: int = 1000, mean: list[float] | None = None,
                 std: list[float] | None = None, device_resident: bool = True, loader: str = "memory",
                 num_workers: int = 0, seed: int = 0, key: str = "data") -> None:
        super().__init__()
        self.classes = list(classes) if classes is not None else None
        self.samples_per_class, self.imbalance_ratio = samples_per_class, imbalance_ratio
        self.imbalance_remedy, self.val_fraction = imbalance_remedy, val_fraction
        self.max_val_per_class, self.val_per_class = max_val_per_class, val_per_class
        self.channels, self.image_size, self.augment = channels, image_size, augment
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.device_resident, self.seed, self.key = device_resident, seed, key
        self.loader, self.num_workers = loader, num_workers
        check_options(self)
        check_stats(mean, std, key)
        self._norm_override = (list(mean), list(std)) if mean is not None else None
        self._ready = False
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self._minority: torch.Tensor | None = None

    # --- override -------------------------------------------------------------------------
    def load_arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Override to return ``(x_train, y_train, x_test, y_test)``."""
        raise NotImplementedError(f"{type(self).__name__} must override load_arrays()")

    def allows_hflip(self) -> bool:
        """Override to return False where mirrored images change meaning (digits)."""
        return True

    def input_files(self) -> list[str | Path] | None:
        """Override to list the files or folders ``load_arrays`` reads ([] for none): trials in
        one process then reuse the prepared data while those are unchanged (``prepared_cache``).
        None (the default): unknown, prepared every time."""
        return None

    # --- shaping ----------------------------------------------------------------------------
    def prepare(self) -> TransferDataModule:
        """Load and shape the data once; raises ``ConfigError`` on impossible settings."""
        if self._ready:
            return self
        xtr, ytr, xte, yte = self.load_arrays()
        xtr, ytr = check_images(xtr, ytr, self.describe("train"))
        xte, yte = check_images(xte, yte, self.describe("test"))
        check_shapes(self, xtr, xte)
        keep = self._check_classes(ytr)
        check_test_labels(self, yte, keep)
        xtr, ytr = _select(xtr, ytr, keep)
        xte, yte = _select(xte, yte, keep)
        tr_idx, val_idx = split_indices(self, ytr)
        self.train_counts = np.bincount(ytr[tr_idx], minlength=self.num_classes)
        self.val_counts = np.bincount(ytr[val_idx], minlength=self.num_classes)
        pool = self._to_tensor(xtr)  # adapted once; statistics from the unlabelled pool
        self.mean, self.std = self._normalization(pool)
        self.x_train, self.y_train = pool[tr_idx], torch.as_tensor(ytr[tr_idx], dtype=torch.long)
        self.x_val, self.y_val = pool[val_idx], torch.as_tensor(ytr[val_idx], dtype=torch.long)
        self.x_test, self.y_test = self._to_tensor(xte), torch.as_tensor(yte, dtype=torch.long)
        self._ready = True
        return self

    def describe(self, split: str) -> str:
        """Override to name where the ``split`` (train/test) arrays come from, as the user sets it."""
        return f"{self.key} ({split} arrays of {type(self).__name__})"

    def _normalization(self, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pool's channel statistics, or the override (a pretrained model's own)."""
        if self._norm_override is None:
            return _channel_stats(pool)
        mean, std = (torch.tensor(v, dtype=torch.float32) for v in self._norm_override)
        if len(mean) != pool.shape[1]:
            raise ConfigError(f"{self.key}.mean/std: {len(mean)} values for {pool.shape[1]}-channel images; "
                              "give one per channel (or set channels to match)")
        return mean, std

    def _check_classes(self, y: np.ndarray) -> list[int]:
        present = sorted(int(c) for c in np.unique(y))
        if present and present[0] < 0:
            raise ConfigError(f"{self.key}: labels must be ≥ 0 (found {present[0]})")
        if self.classes is None:
            self.class_names = present
            return present
        if len(self.classes) == 0:
            raise ConfigError(f"{self.key}.classes=[]: the class list is empty")
        bad = [c for c in self.classes if c not in present]
        if bad:
            raise ConfigError(f"{self.key}.classes: {bad} out of range; this dataset has labels "
                              f"{present[0]}..{present[-1]}")
        if len(set(self.classes)) != len(self.classes):
            raise ConfigError(f"{self.key}.classes={self.classes}: repeated class")
        self.class_names = list(self.classes)
        return self.class_names

    def _to_tensor(self, x: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x))
        t = t.unsqueeze(1) if t.ndim == 3 else t.permute(0, 3, 1, 2)
        c = self.channels or t.shape[1]
        s = self.image_size or t.shape[-1]
        return adapt_images(t, c, s)

    # --- facts the run wires into models ---------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    @property
    def class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency loss weights (mean 1) when ``imbalance_remedy=reweight``."""
        if self.imbalance_remedy != "reweight":
            return None
        w = 1.0 / torch.as_tensor(self.train_counts, dtype=torch.float)
        return w * len(w) / w.sum()

    def summary(self) -> dict:
        vals = sorted(set(self.val_counts.tolist()))
        return {"classes": self.class_names, "input_shape": list(self.input_shape),
                "n_train": len(self.y_train), "n_val": len(self.y_val), "n_test": len(self.y_test),
                "train_counts": [int(c) for c in self.train_counts],
                # the validation protocol: a few-shot result tuned on many labels is not few-shot
                "val_mode": {None: "fraction", "budget": "budget"}.get(self.val_per_class, "fixed"),
                "val_per_class": int(vals[0]) if len(vals) == 1 else None,
                "val_counts": [int(c) for c in self.val_counts],
                "normalization": "dataset" if self._norm_override is None else "model",
                "mean": [round(float(v), 6) for v in self.mean], "std": [round(float(v), 6) for v in self.std]}

    # --- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        self.prepare()
        # the PIL path reads numpy views on the CPU; only the fast path lives on the device
        if self.loader == "memory" and self.device_resident and self.trainer is not None:
            device = self.trainer.strategy.root_device
            for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
                setattr(self, name, getattr(self, name).to(device))

    def _loader(self, x, y, train: bool) -> BatchLoader | torch.utils.data.DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        weights = None
        if train and self.imbalance_remedy in ("resample", "augment"):
            weights = (1.0 / torch.as_tensor(self.train_counts, dtype=torch.float))[y.cpu()]
        if self.loader == "torchvision":
            return self._pil_loader(x, y, train, weights)
        return BatchLoader(x, y, self.batch_size if train else self.eval_batch_size, shuffle=train,
                           seed=self.seed, rank=rank, world_size=world, sample_weights=weights)

    def _pil_loader(self, x, y, train: bool, weights: torch.Tensor | None) -> torch.utils.data.DataLoader:
        tf = pil_transform(self.mean, self.std, train, self.augment, self.allows_hflip(), x.shape[-1])
        sampler = None
        if weights is not None:  # Lightning wraps it for DDP (DistributedSamplerWrapper)
            sampler = torch.utils.data.WeightedRandomSampler(
                weights, len(weights), generator=torch.Generator().manual_seed(self.seed))
        return pil_loader(PILDataset(x, y, tf), self.batch_size if train else self.eval_batch_size,
                          shuffle=train, seed=self.seed, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), sampler=sampler)

    def train_dataloader(self) -> BatchLoader:
        return self._loader(self.x_train, self.y_train, train=True)

    def val_dataloader(self) -> BatchLoader:
        return self._loader(self.x_val, self.y_val, train=False)

    def test_dataloader(self) -> BatchLoader:
        return self._loader(self.x_test, self.y_test, train=False)

    def transform(self, x: torch.Tensor, train: bool, y: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 batch on device → normalised float batch, augmented when training (with
        ``imbalance_remedy=augment`` and labels ``y``: minority-class images are cropped too)."""
        if train and self.augment != "none":
            flip = self.augment == "crop_flip" and self.allows_hflip()
            x = random_crop(x, padding=max(1, x.shape[-1] // 8), flip=flip)
        elif train and self.imbalance_remedy == "augment" and y is not None:
            if self._minority is None or self._minority.device != x.device:  # copied once per device
                self._minority = torch.as_tensor(self.train_counts < self.train_counts.max(), device=x.device)
            minority = self._minority
            cropped = random_crop(x, padding=max(1, x.shape[-1] // 8), flip=self.allows_hflip())
            x = torch.where(minority[y].view(-1, 1, 1, 1), cropped, x)  # no host sync
        if self._stats is None or self._stats[0].device != x.device:
            # copied to the batch's device once: a per-batch host→device copy of these
            # constants would block the host on every step
            self._stats = (self.mean.to(x.device), self.std.to(x.device))
        return normalize(x, *self._stats)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        if x.dtype != torch.uint8:  # the torchvision path has already transformed per sample
            return batch
        training = self.trainer is not None and self.trainer.training
        return self.transform(x, training, y), y


def _select(x: np.ndarray, y: np.ndarray, keep: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Keep the listed labels and remap them to 0..k-1 in the listed order."""
    y = np.asarray(y, dtype=np.int64)
    keep_arr = np.asarray(keep, dtype=np.int64)
    order = np.argsort(keep_arr)
    # searchsorted over the kept labels: no table sized by the largest label, no wrap-around
    pos = np.clip(np.searchsorted(keep_arr[order], y), 0, len(keep_arr) - 1)
    mask = keep_arr[order][pos] == y
    return x[mask], order[pos[mask]]


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x[:20000].float().div_(255.0)
    # one pixel in all has no spread (std is NaN): 1 leaves it merely centred
    std = xf.std(dim=(0, 2, 3)) if xf[:, 0].numel() > 1 else torch.ones(xf.shape[1])
    return xf.mean(dim=(0, 2, 3)), std.clamp_min(1e-3)
