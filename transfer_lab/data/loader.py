"""Two data paths over the same uint8 arrays.

* ``BatchLoader`` + ``normalize`` / ``random_crop`` / ``random_hflip``: the fast path. Batches are
  sliced from tensors already on the training device and converted, normalised and augmented as
  batched tensor ops there — no per-sample Python, no PIL.
* ``PILDataset`` + ``pil_loader``: the standard torchvision ``Dataset`` + ``DataLoader`` path
  (per-sample PIL image, ``transforms.Compose``), kept as an option and as the benchmark's baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


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
            # index_select: the same rows as ``x[sel]`` without advanced indexing's generic
            # path (~80 vs ~10 µs for a batch of 64 MNIST images on a CPU core)
            yield self.x.index_select(0, sel), self.y.index_select(0, sel)


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
    """uint8 batch → float, scaled to [0, 1] and standardised per channel.

    ``(x/255 - mean)/std`` folded into one multiply-add, ``x·a + b``: two passes over the batch
    (convert, fused multiply-add) instead of four.
    """
    scale = (1.0 / (255.0 * std)).to(x.device, dtype).view(1, -1, 1, 1)
    shift = (-mean / std).to(x.device, dtype).view(1, -1, 1, 1)
    return torch.addcmul(shift, x.to(dtype), scale)


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator | None = None,
                flip: bool = False) -> torch.Tensor:
    """Batched random crop after zero padding (one offset per image), optionally with a random
    horizontal flip per image, as a single gather over the flattened padded images.

    A flip only reverses the column index of the gather, so crop + flip cost one pass; this is
    ~4× faster on the CPU than indexing with four broadcast index tensors.
    """
    n, c, h, w = x.shape
    pw = w + 2 * padding
    xp = F.pad(x, (padding,) * 4).view(n, c, -1)
    oy = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), device=x.device, generator=generator)
    rows = torch.arange(h, device=x.device).view(1, h, 1) * pw
    cols = torch.arange(w, device=x.device).view(1, 1, w).expand(n, 1, w)
    if flip:
        mirror = torch.rand(n, device=x.device, generator=generator) < 0.5
        cols = torch.where(mirror.view(n, 1, 1), w - 1 - cols, cols)
    idx = ((oy * pw + ox).view(n, 1, 1) + rows + cols).view(n, 1, h * w).expand(n, c, h * w)
    return torch.gather(xp, 2, idx).view(n, c, h, w)


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


class PILDataset(Dataset):
    """The classic torchvision-style dataset: one PIL image per ``__getitem__``, then ``transform``.

    Args:
        x: ``(N, C, H, W)`` uint8 images on the CPU (C is 1 or 3).
        y: ``(N,)`` labels.
        transform: a torchvision transform taking a PIL image (e.g. ``ToTensor`` + ``Normalize``).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform: Callable) -> None:
        # HWC numpy views, as torchvision.datasets.CIFAR10 keeps them; PIL wants HW for grey
        arr = x.cpu().permute(0, 2, 3, 1).numpy()
        self.x = arr[..., 0] if arr.shape[-1] == 1 else arr
        self.y, self.transform = y.cpu(), transform
        self.mode = "L" if arr.shape[-1] == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.x[i], mode=self.mode)), int(self.y[i])


def pil_transform(mean: torch.Tensor, std: torch.Tensor, train: bool, augment: str,
                  hflip: bool, size: int):
    """torchvision transforms equal in effect to the fast path's ``transform`` (crop pad size//8)."""
    from torchvision import transforms as T

    steps = []
    if train and augment != "none":
        steps.append(T.RandomCrop(size, padding=max(1, size // 8)))
        if augment == "crop_flip" and hflip:
            steps.append(T.RandomHorizontalFlip())
    steps += [T.ToTensor(), T.Normalize(mean.tolist(), std.tolist())]
    return T.Compose(steps)


def pil_loader(dataset: PILDataset, batch_size: int, shuffle: bool, seed: int = 0,
               num_workers: int = 0, pin_memory: bool = False,
               sampler: torch.utils.data.Sampler | None = None) -> DataLoader:
    """A standard ``DataLoader`` over ``dataset``; shuffling seeded by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None,
                      sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      generator=g, persistent_workers=num_workers > 0)
