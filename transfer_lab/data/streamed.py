"""The streamed path of ``data=image_folder``: a cached ``x.npy`` read through its memory map.

``RowImages`` stands in for ``dm.x_*`` without holding the array; ``Batches`` and ``BatchOrder``
let a ``DataLoader``'s workers gather whole batches in ``BatchLoader``'s order; ``row_tokens``
are the one-pixel stand-ins the base class splits and subsets in place of the images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from transfer_lab.data.loader import BatchLoader


class RowImages:
    """Images ``rows`` of a cached ``x.npy``, read from its memory map when indexed, as uint8
    ``(n, C, H, W)`` tensors: what code that slices ``dm.x_train`` (LogME, distillation's logit
    cache, DANN's target stream) needs, without holding the array. Picklable for workers."""

    def __init__(self, path: Path, rows: np.ndarray) -> None:
        self.path, self.rows = path, rows
        self._x: np.ndarray | None = None
        self.device, self.dtype = torch.device("cpu"), torch.uint8

    def _array(self) -> np.ndarray:
        if self._x is None:
            self._x = np.load(self.path, mmap_mode="r")
        return self._x

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_x": None}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        x = self._array()
        c = 1 if x.ndim == 3 else x.shape[3]
        return torch.Size((len(self.rows), c, x.shape[1], x.shape[2]))

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        x = torch.from_numpy(self._array()[self.rows[idx]])
        return (x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)).contiguous()

    def split(self, size: int):
        return (self[slice(i, i + size)] for i in range(0, len(self), size))

    def to(self, device, *args, **kwargs):
        return self if torch.device(device).type == "cpu" else self[:].to(device, *args, **kwargs)


class Batches(Dataset):
    """One whole batch per item: a worker reads a batch with one memory-map gather."""

    def __init__(self, x: RowImages, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[pos], self.y[pos]


class BatchOrder(Sampler):
    """Index batches in ``BatchLoader``'s order; Lightning's ``set_epoch`` reaches it."""

    def __init__(self, order: BatchLoader) -> None:
        self.order = order

    def __iter__(self):
        return (pos for pos, _ in self.order)

    def __len__(self) -> int:
        return len(self.order)

    def set_epoch(self, epoch: int) -> None:
        self.order.set_epoch(epoch)


def row_tokens(n: int, channels: int) -> np.ndarray:
    """``(n, 1, 4, C)`` uint8 stand-ins: image ``i`` carries ``i`` as 4 little-endian bytes."""
    b = np.arange(n, dtype="<u4").view(np.uint8).reshape(n, 1, 4, 1)
    return np.repeat(b, channels, axis=3)
