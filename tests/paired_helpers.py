"""Local helpers of the paired-data tests (tests/test_paired.py and its DDP probe script):
data modules whose images carry their own index, so a test can tell which images a batch holds."""

from __future__ import annotations

import numpy as np
import torch

from transfer_lab.data.datamodule import TransferDataModule


class IdData(TransferDataModule):
    """``n`` random 8×8 grey images; image ``i`` stores ``i`` in its first two pixels, label ``i % k``."""

    def __init__(self, n: int = 48, k: int = 3, offset: int = 0, **kwargs) -> None:
        kwargs.setdefault("val_fraction", 0.0)
        kwargs.setdefault("batch_size", 8)
        super().__init__(**kwargs)
        self.n, self.k, self.offset = n, k, offset

    def load_arrays(self):
        rng = np.random.default_rng(self.offset)
        ids = np.arange(self.n) + self.offset
        x = rng.integers(0, 256, (self.n, 8, 8), dtype=np.uint8)
        x[:, 0, 0], x[:, 0, 1] = ids % 256, ids // 256
        y = ids % self.k
        return x, y, x[: self.k], y[: self.k]


def image_ids(x: torch.Tensor, dm: TransferDataModule) -> list[int]:
    """The indices stored in a batch's images, uint8 or already normalised by ``dm``."""
    if x.dtype != torch.uint8:
        x = (x[:, 0] * dm.std[0] + dm.mean[0]).mul(255).round()
    px = x[:, 0, 0, :2].long() if x.ndim == 4 else x[:, 0, :2].long()
    return (px[:, 0] + 256 * px[:, 1]).tolist()
