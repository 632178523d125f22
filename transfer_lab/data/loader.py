"""In-memory batch loader and batched on-device transforms (no per-sample Python, no PIL)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class BatchLoader:
    """Yields ``(x_uint8, y)`` batches by slicing tensors that already sit in memory.

    Shuffling is seeded by ``seed`` and the epoch, so a run is reproducible and a resumed run
    sees the same order. Under DDP each rank takes an equal, disjoint share of each epoch.

    Args:
        x: ``(N, C, H, W)`` uint8 images (on CPU or on the training device).
        y: ``(N,)`` int64 labels.
        sample_weights: if given, each epoch draws N indices with replacement ∝ these weights.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 seed: int = 0, drop_last: bool = False, rank: int = 0, world_size: int = 1,
                 sample_weights: torch.Tensor | None = None) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.rank, self.world_size = rank, world_size
        self.sample_weights = sample_weights
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _per_rank(self) -> int:
        return math.ceil(len(self.y) / self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _indices(self) -> torch.Tensor:
        n = len(self.y)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.sample_weights is not None:
            idx = torch.multinomial(self.sample_weights, n, replacement=True, generator=g)
        elif self.shuffle:
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:  # pad by wrapping so every rank gets the same number of batches
            total = self._per_rank() * self.world_size
            idx = torch.cat([idx, idx[: total - n]])[self.rank::self.world_size]
        return idx.to(self.x.device)

    def __iter__(self):
        idx = self._indices()
        self.epoch += 1
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield self.x[sel], self.y[sel]


def adapt_images(x: torch.Tensor, channels: int, size: int) -> torch.Tensor:
    """Convert uint8 ``(N, C, H, W)`` images to ``channels`` (grey↔RGB) and ``size``×``size``.

    Grey→RGB repeats the channel; RGB→grey uses ITU-R 601 luma weights. Resizing is bilinear
    with antialiasing, done once per dataset (not per batch), in chunks to bound memory.
    """
    c = x.shape[1]
    if c != channels:
        if c == 1:
            x = x.repeat(1, channels, 1, 1)
        elif channels == 1 and c == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            x = (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"data.channels={channels}: cannot convert {c}-channel images "
                             f"(supported: 1↔3)")
    if x.shape[-1] != size or x.shape[-2] != size:
        out = [F.interpolate(chunk.float(), size=(size, size), mode="bilinear",
                             antialias=True, align_corners=False)
               for chunk in x.split(4096)]
        x = torch.cat(out).round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 batch → float, scaled to [0, 1] and standardised per channel."""
    x = x.to(dtype).div_(255.0)
    return (x - mean.to(x.device, dtype).view(1, -1, 1, 1)) / std.to(x.device, dtype).view(1, -1, 1, 1)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Batched random crop after zero padding: one offset per image, a single gather."""
    n, c, h, w = x.shape
    xp = F.pad(x, (padding,) * 4)
    oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    ni = torch.arange(n, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[ni, ci, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
