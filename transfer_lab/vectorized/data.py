"""K seeds' data modules as one: a training step gets the K batches of one step stacked (K×B×…),
validation and test run each seed's own loader (dataloader ``k`` is seed ``k``)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from transfer_lab.data.datamodule import TransferDataModule


class NotVectorisable(Exception):
    """These cells cannot be trained as one vectorised model; train them one at a time."""


class StackedLoader:
    """Zips K training loaders: one item is the list of the K seeds' batches of that step."""

    def __init__(self, loaders: list[Any]) -> None:
        lengths = {len(ld) for ld in loaders}
        if len(lengths) != 1:
            raise NotVectorisable(f"the seeds' training loaders have different numbers of batches "
                                  f"({sorted(lengths)}): a step needs one batch of every seed")
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0])

    def set_epoch(self, epoch: int) -> None:
        # each loader shuffles by its own seed and this epoch, as the seed's separate run does
        for ld in self.loaders:
            if hasattr(ld, "set_epoch"):
                ld.set_epoch(epoch)

    def __iter__(self):
        return (list(batches) for batches in zip(*self.loaders))


class StackedDataModule(L.LightningDataModule):
    """The K seeds' ``TransferDataModule``s; each seed's batches are transformed by its own module."""

    def __init__(self, dms: list[TransferDataModule]) -> None:
        super().__init__()
        self.dms = dms
        sizes = {(len(dm.y_train), dm.batch_size) for dm in dms}
        if len(sizes) != 1:
            raise NotVectorisable(f"the seeds' training sets differ in (size, batch size): {sorted(sizes)}")

    def setup(self, stage: str | None = None) -> None:
        for dm in self.dms:
            dm.trainer = self.trainer  # device, rank and the training flag come from it
            dm.setup(stage)

    def train_dataloader(self) -> StackedLoader:
        return StackedLoader([dm.train_dataloader() for dm in self.dms])

    def val_dataloader(self) -> list:
        return [dm.val_dataloader() for dm in self.dms]

    def test_dataloader(self) -> list:
        return [dm.test_dataloader() for dm in self.dms]

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if self.trainer is not None and self.trainer.training:
            pairs = [dm.on_after_batch_transfer(tuple(b), 0) for dm, b in zip(self.dms, batch)]
            return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        return self.dms[dataloader_idx].on_after_batch_transfer(batch, dataloader_idx)
