"""Two training streams in one step: the one data component of every two-stream strategy.

``PairedData`` trains on a *main* data module's batches, each paired with one of:

* a batch of a **second data module** (cycled; an epoch is one pass over the main stream):
  ``multitask`` (target + labelled source), ``dann`` (labelled source + target images, labels
  dropped with ``second_labels=False``);
* **per-sample rows** computed once at ``setup`` (distillation's cached teacher logits), picked by
  the positions of the main batch's images.

Validation and test batches come from ``evaluate`` (default: the main data module); ``validate``
puts validation (model selection, tuning, the convergence check) on another data module's
validation split — unsupervised domain adaptation selects on the labelled *source* domain.

Each stream keeps what its own data module does: its loader kind (``memory`` or
``torchvision``), its normalisation and augmentation (``on_after_batch_transfer``, which leaves
the torchvision path's already transformed batches alone), its sampling weights. Each stream is
sharded by the trainer's rank and world size — the in-memory loaders by the data module itself,
torchvision ``DataLoader`` s by a ``DistributedSampler`` here (Lightning cannot inject one into
loaders it does not see) — and ``set_epoch`` puts both streams where an uninterrupted run is.

Training batches are ``(x, y)`` alone, or ``(x, y, second)`` with ``second`` = ``(xs, ys)``,
``xs`` (unlabelled) or the rows of ``per_sample``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.data.loader import BatchLoader
from transfer_lab.errors import ConfigError

PerSample = Callable[[TransferDataModule, L.Trainer], torch.Tensor]


class PairedData(L.LightningDataModule):
    """Main training batches plus a second stream; validation and test from ``evaluate``.

    Args:
        main: the data module whose training set defines the epoch (and the train metric's labels).
        second: a data module whose training batches are cycled alongside.
        second_labels: False yields the second stream's images alone (its labels are never read).
        per_sample: ``(main, trainer) -> rows``, one row per main training image, computed once
            at ``setup`` on the training device (needs ``main.loader=memory``).
        evaluate: validation and test data (default ``main``).
        validate: validation data instead of ``evaluate`` (its ``val`` split and normalisation).
    """

    def __init__(self, main: TransferDataModule, second: TransferDataModule | None = None,
                 second_labels: bool = True, per_sample: PerSample | None = None,
                 evaluate: TransferDataModule | None = None,
                 validate: TransferDataModule | None = None) -> None:
        super().__init__()
        if second is not None and per_sample is not None:
            raise ValueError("PairedData: pass a second data module or per_sample rows, not both")
        if per_sample is not None and main.loader != "memory":
            raise ConfigError(f"{main.key}.loader={main.loader}: per-sample rows (cached teacher "
                              f"logits) need {main.key}.loader=memory")
        self.main, self.second, self.second_labels = main, second, second_labels
        self.per_sample, self.evaluate = per_sample, evaluate or main
        self.validate = validate or self.evaluate
        self.rows: torch.Tensor | None = None

    def _modules(self) -> list[TransferDataModule]:
        mods = (self.main, self.second, self.evaluate, self.validate)
        return list(dict.fromkeys(m for m in mods if m is not None))

    def setup(self, stage: str | None = None) -> None:
        for dm in self._modules():
            dm.trainer = self.trainer  # device placement, rank and train/eval mode come from it
            dm.setup(stage)
        if self.per_sample is not None and (self.rows is None or
                                            self.rows.device != self.main.y_train.device):
            self.rows = self.per_sample(self.main, self.trainer)

    def train_dataloader(self) -> PairedLoader | BatchLoader | EpochLoader:
        main = stream(self.main)
        if self.rows is not None:
            return RowLoader(main, self.rows)
        if self.second is None:
            return main
        return PairedLoader(main, stream(self.second), self.second_labels)

    def val_dataloader(self):
        return self.validate.val_dataloader()

    def test_dataloader(self):
        return self.evaluate.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.validate is not self.evaluate and self.trainer is not None and (
                getattr(self.trainer, "validating", False) or getattr(self.trainer, "sanity_checking", False)):
            return self.validate.on_after_batch_transfer(batch, dataloader_idx)
        if self.trainer is None or not self.trainer.training:
            return self.evaluate.on_after_batch_transfer(batch, dataloader_idx)
        x, y, *rest = batch  # y: imbalance_remedy=augment crops by label
        x, y = self.main.on_after_batch_transfer((x, y), dataloader_idx)
        if not rest:
            return x, y
        other = rest[0]
        if self.second is not None and self.second_labels:
            other = self.second.on_after_batch_transfer(tuple(other), dataloader_idx)
        elif self.second is not None:
            other = self.second.on_after_batch_transfer((other, None), dataloader_idx)[0]
        return x, y, other


def stream(dm: TransferDataModule) -> BatchLoader | EpochLoader:
    """``dm``'s training loader, sharded by its trainer's rank and with ``set_epoch``."""
    loader = dm.train_dataloader()
    if isinstance(loader, DataLoader):
        rank, world = (0, 1) if dm.trainer is None else (dm.trainer.global_rank, dm.trainer.world_size)
        return EpochLoader(loader, rank, world, dm.seed)
    return loader  # a BatchLoader: the data module already shards it by rank


class EpochLoader:
    """A torchvision ``DataLoader`` rebuilt over this rank's share of each epoch, in an order set
    by the epoch (as ``BatchLoader``: each pass advances the epoch, ``set_epoch`` sets it)."""

    def __init__(self, loader: DataLoader, rank: int, world_size: int, seed: int) -> None:
        inner = loader.sampler
        if isinstance(inner, (RandomSampler, SequentialSampler)):
            sampler = DistributedSampler(loader.dataset, world_size, rank,
                                         shuffle=isinstance(inner, RandomSampler), seed=seed)
        else:  # weighted (class-balanced) sampling: Lightning's wrapper shards its draws
            sampler = DistributedSamplerWrapper(inner, num_replicas=world_size, rank=rank, seed=seed)
        self.sampler, self.epoch = sampler, 0
        self.loader = DataLoader(loader.dataset, loader.batch_size, sampler=sampler,
                                 num_workers=loader.num_workers, pin_memory=loader.pin_memory,
                                 persistent_workers=loader.persistent_workers)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        self.sampler.set_epoch(self.epoch)
        self.epoch += 1
        return iter(self.loader)


class PairedLoader:
    """One pass over ``main`` per epoch, each batch ``(x, y, second)`` with the next batch of a
    cycling ``second`` loader (which reshuffles at every wrap)."""

    def __init__(self, main, second, second_labels: bool = True) -> None:
        self.main, self.second, self.second_labels = main, second, second_labels
        self._second_iter: Iterator | None = None
        self._consumed = 0  # second-stream batches drawn so far

    def __len__(self) -> int:
        return len(self.main)

    def set_epoch(self, epoch: int) -> None:
        """Put both loaders where an uninterrupted run is at ``epoch`` (resume): the second stream
        has then given ``epoch · len(main)`` batches of its cycling passes."""
        self.main.set_epoch(epoch)
        consumed = epoch * len(self.main)
        if consumed == self._consumed:
            return  # the running second iterator is already there
        passes, offset = divmod(consumed, max(1, len(self.second)))
        self.second.set_epoch(passes)
        self._second_iter = iter(self.second)
        for _ in range(offset):
            next(self._second_iter)
        self._consumed = consumed

    def _next_second(self) -> Any:
        self._consumed += 1
        if self._second_iter is None:
            self._second_iter = iter(self.second)
        try:
            batch = next(self._second_iter)
        except StopIteration:
            self._second_iter = iter(self.second)
            batch = next(self._second_iter)
        return tuple(batch) if self.second_labels else batch[0]

    def __iter__(self) -> Iterator:
        for x, y in itertools.islice(iter(self.main), len(self.main)):
            yield x, y, self._next_second()


class RowLoader(BatchLoader):
    """The main ``BatchLoader`` yielding ``(x, y, rows[positions])``.

    It shuffles positions ``0..N-1`` with the wrapped loader's own settings (seed, epoch, sample
    weights, DDP share), so batches and their order are exactly those of the plain loader;
    labels and rows are then picked by position.
    """

    def __init__(self, base: BatchLoader, rows: torch.Tensor) -> None:
        self.__dict__.update(base.__dict__)
        self.labels, self.rows = base.y, rows
        self.y = torch.arange(len(base.y), device=base.y.device)

    def __iter__(self) -> Iterator:
        for x, pos in super().__iter__():
            yield x, self.labels[pos], self.rows[pos]
