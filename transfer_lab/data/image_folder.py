"""``data=image_folder``: a folder per class (torchvision's ``ImageFolder`` layout), decoded once.

Each image is fitted to ``image_size`` (centre crop + resize, ``PIL.ImageOps.fit``) as grey or RGB,
and the folder is stored once as uint8 ``.npy`` arrays under ``cache_dir``, keyed by its content
(relative names, sizes, mtimes) and the decode settings. Arrays within ``memory_budget_mb`` go
through the base class like any dataset; larger ones are streamed: the base class still does
labels, class subsets, budgets, imbalance and the validation split (on a one-pixel stand-in per
image carrying its row), and a ``DataLoader`` with workers reads batches from the memory map in
the in-memory loader's order, for the same batch transform.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.data.loader import BatchLoader
from transfer_lab.data.streamed import BatchOrder, Batches, RowImages, row_tokens
from transfer_lab.errors import ConfigError

CACHE_VERSION = 1  # bump when the decoding changes: old entries are then never read
GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class ImageFolderData(TransferDataModule):
    """Images in ``root/{train,test}/<class>/`` (class names: the folder names, sorted).

    Args:
        root: the folder holding ``train/`` (and optionally ``test/``).
        test_fraction: share of each class held out for testing when there is no ``test/``.
        split_seed: draws that test split (fixed across runs, not the run seed).
        cache_dir: where decoded arrays are kept (None: ``$TRANSFER_LAB_CACHE`` or ``cache``).
        memory_budget_mb: decoded arrays up to this size are held in memory, larger are streamed.
        hflip: mirrored images keep their meaning (allows ``augment=crop_flip``'s flips).
        classes: class subset by folder name or by index into the sorted names.
    """

    def __init__(self, root: str, test_fraction: float = 0.2, split_seed: int = 0,
                 cache_dir: str | None = None, memory_budget_mb: float = 1024, hflip: bool = True,
                 classes: list[int | str] | None = None, **kwargs) -> None:
        super().__init__(classes=classes, **kwargs)
        if not 0 < test_fraction < 1:
            raise ConfigError(f"{self.key}.test_fraction={test_fraction}: must be in (0, 1)")
        self.root, self.test_fraction, self.split_seed = Path(root), test_fraction, split_seed
        self.cache_dir = Path(cache_dir or os.environ.get("TRANSFER_LAB_CACHE", "cache")) / "image_folder"
        self.memory_budget_mb, self.hflip = memory_budget_mb, hflip
        self.folder_classes: list[str] = []
        self.streamed, self.cache_hit = False, False

    def allows_hflip(self) -> bool:
        return self.hflip

    def describe(self, split: str) -> str:
        return f"{self.key}.root={self.root} ({split})"

    def input_files(self) -> list[Path]:
        return [self.root]

    # --- the folder -------------------------------------------------------------------------
    def scan(self) -> tuple[list[str], list[tuple[str, int, int]]]:
        """``(class names, [(relative path, label, split)])``; split 0 = train/, 1 = test/."""
        from PIL import Image

        if not (self.root / "train").is_dir():
            raise ConfigError(f"{self.key}.root={self.root}: no {self.root / 'train'} directory "
                              "(expected root/train/<class>/<images> and optionally root/test/<class>/)")
        exts = set(Image.registered_extensions())
        splits = [s for s in ("train", "test") if (self.root / s).is_dir()]
        names = {s: sorted(d.name for d in (self.root / s).iterdir()
                           if d.is_dir() and not d.name.startswith(".")) for s in splits}
        classes = names["train"]
        if not classes:
            raise ConfigError(f"{self.key}.root={self.root}: train/ has no class folders")
        if "test" in names and names["test"] != classes:
            only_tr, only_te = sorted(set(classes) - set(names["test"])), sorted(set(names["test"]) - set(classes))
            raise ConfigError(f"{self.key}.root={self.root}: train/ and test/ hold different classes "
                              f"(only in train: {only_tr or '-'}; only in test: {only_te or '-'})")
        files = []
        for s, split in zip(splits, (0, 1)):
            for label, c in enumerate(classes):
                found = sorted(p for p in (self.root / s / c).rglob("*") if p.is_file()
                               and p.suffix.lower() in exts and not p.name.startswith("."))
                if not found:
                    raise ConfigError(f"{self.key}.root={self.root}: {s}/{c}/ holds no images")
                files += [(str(p.relative_to(self.root)), label, split) for p in found]
        return classes, files

    def cache_key(self, files: list[tuple[str, int, int]]) -> str:
        h = hashlib.sha256(json.dumps([CACHE_VERSION, self.channels, self.image_size]).encode())
        for rel, label, split in files:
            st = (self.root / rel).stat()
            h.update(f"{rel}\0{label}\0{split}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:24]

    def _decode_all(self, files: list[tuple[str, int, int]], out: Path) -> None:
        """Decode every image into ``out/{x,y,split}.npy`` (written to a temp dir, then renamed);
        ``x`` is filled through a memory map, so a folder larger than memory decodes too."""
        size, grey_all = self._headers(files)
        mode = "L" if self.channels == 1 or (self.channels is None and grey_all) else "RGB"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp.", dir=out.parent))
        try:
            x = np.lib.format.open_memmap(tmp / "x.npy", mode="w+", dtype=np.uint8,
                                          shape=(len(files), size, size, *(() if mode == "L" else (3,))))
            for i, (rel, _, _) in enumerate(files):
                x[i] = self._decode(rel, size, mode)
            x.flush()
            del x
            np.save(tmp / "y.npy", np.array([f[1] for f in files], dtype=np.int64))
            np.save(tmp / "split.npy", np.array([f[2] for f in files], dtype=np.int8))
            os.replace(tmp, out)  # atomic; a concurrent writer of the same key may have won
        except OSError:
            if not (out / "x.npy").is_file():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _open(self, rel: str, load: bool = True):
        from PIL import Image

        try:
            im = Image.open(self.root / rel)
            if load:
                im.load()  # a truncated file fails here, not later in training
            return im
        except Exception as e:  # noqa: BLE001 — PIL raises many types for a bad file
            raise ConfigError(f"{self.key}.root: cannot read image {self.root / rel} "
                              f"({type(e).__name__}: {e}); remove or replace the file") from None

    def _headers(self, files: list[tuple[str, int, int]]) -> tuple[int, bool]:
        """Output size (``image_size``, or the images' own when all are one square size) and
        whether every image is grey — from the file headers, before any pixel is decoded."""
        sizes, grey = set(), True
        for rel, _, _ in files:
            with self._open(rel, load=False) as im:
                sizes.add(im.size)
                grey &= im.mode in GREY_MODES
        if self.image_size is not None:
            return self.image_size, grey
        if len(sizes) != 1 or len(set(next(iter(sizes)))) != 1:
            raise ConfigError(f"{self.key}.image_size=null: the images are not all one square size "
                              f"({', '.join(f'{w}×{h}' for w, h in sorted(sizes)[:4])}); set "
                              f"{self.key}.image_size")
        return next(iter(sizes))[0], grey

    def _decode(self, rel: str, size: int, mode: str) -> np.ndarray:
        from PIL import Image, ImageOps

        with self._open(rel) as im:
            im = im.convert(mode)  # "L": ITU-R 601 luma, as adapt_images
            if im.size != (size, size):
                im = ImageOps.fit(im, (size, size), method=Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)

    def _arrays(self) -> tuple[Path, np.ndarray, np.ndarray]:
        """The cache entry for the folder as it is now (decoded if new), labels and splits."""
        self.folder_classes, files = self.scan()
        entry = self.cache_dir / self.cache_key(files)
        self.cache_hit = (entry / "x.npy").is_file()
        if not self.cache_hit:
            entry.parent.mkdir(parents=True, exist_ok=True)
            self._decode_all(files, entry)
        y, split = np.load(entry / "y.npy"), np.load(entry / "split.npy")
        if not (split == 1).any():  # no test/ folder: a fixed stratified split of train/
            for c in np.unique(y):
                idx = np.flatnonzero(y == c)
                n = int(round(self.test_fraction * len(idx)))
                if n < 1 or n >= len(idx):
                    raise ConfigError(f"{self.key}.test_fraction={self.test_fraction}: class "
                                      f"{self.folder_classes[c]} has {len(idx)} image(s), too few to split")
                split[np.random.default_rng([self.split_seed, int(c)]).permutation(idx)[:n]] = 1
        return entry / "x.npy", y, split

    def _class_indices(self) -> None:
        """``classes`` may name folders; the base class works on their indices."""
        if self.classes is None:
            return
        idx = []
        for c in self.classes:
            if isinstance(c, str) and not c.lstrip("-").isdigit():
                if c not in self.folder_classes:
                    raise ConfigError(f"{self.key}.classes: no class folder {c!r} (classes: "
                                      f"{', '.join(self.folder_classes)})")
                idx.append(self.folder_classes.index(c))
            else:
                idx.append(int(c))
        self.classes = idx

    def load_arrays(self):
        path, y, split = self._arrays()
        self._class_indices()
        x = np.load(path, mmap_mode="r")
        self.streamed = x.nbytes > self.memory_budget_mb * 2**20
        self._x_path, self._y_all, self._split_all = path, y, split
        tr, te = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
        if self.streamed:  # the base class shapes a one-pixel stand-in that carries the row
            x = row_tokens(len(y), 1 if x.ndim == 3 else 3)
        else:
            x = np.asarray(x)
        return x[tr], y[tr], x[te], y[te]

    # --- streamed: the base class's shaping on stand-ins, images read per batch --------------
    def _to_tensor(self, x: np.ndarray) -> torch.Tensor:
        if not self.streamed:
            return super()._to_tensor(x)
        return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)  # stand-ins, as they are

    def prepare(self) -> ImageFolderData:
        if self._ready:
            return self
        super().prepare()
        if self.streamed:
            for name in ("train", "val", "test"):
                tokens = getattr(self, f"x_{name}")
                rows = tokens[:, 0, 0, :].contiguous().numpy().view("<u4").ravel().astype(np.int64)
                setattr(self, f"x_{name}", RowImages(self._x_path, rows))
            if getattr(self, "_norm_override", None) is None:  # the base computed them on stand-ins
                self.mean, self.std = self._pool_stats()
        return self

    def _pool_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The base class's statistics (first 20,000 images of the training pool, in file order),
        accumulated in float64 chunks instead of one float array."""
        pool = np.flatnonzero((self._split_all == 0) & np.isin(self._y_all, self.class_names))[:20000]
        images = RowImages(self._x_path, pool)
        total = sq = None
        for start in range(0, len(pool), 1024):
            x = images[slice(start, start + 1024)].double().div_(255.0)
            s, q = x.sum(dim=(0, 2, 3)), x.square().sum(dim=(0, 2, 3))
            total, sq = (s, q) if total is None else (total + s, sq + q)
        n = len(pool) * images.shape[2] * images.shape[3]
        mean = total / n
        std = ((sq - n * mean.square()) / max(n - 1, 1)).clamp_min(0).sqrt()
        return mean.float(), std.float().clamp_min(1e-3)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def setup(self, stage: str | None = None) -> None:
        if self.prepare().streamed:  # nothing to move: batches are read where the loader runs
            return
        super().setup(stage)

    def _loader(self, x, y, train: bool):
        if not self.streamed:
            return super()._loader(x, y, train)
        weights = None
        if train and self.imbalance_remedy in ("resample", "augment"):
            weights = (1.0 / torch.as_tensor(self.train_counts, dtype=torch.float))[y.cpu()]
        # the in-memory loader's order (same seed, epoch, weights); under DDP Lightning shards
        # this DataLoader's sampler, as for loader=torchvision
        order = BatchLoader(torch.arange(len(y)), y.cpu(), self.batch_size if train else self.eval_batch_size,
                            shuffle=train, seed=self.seed, sample_weights=weights)
        return DataLoader(Batches(x, y.cpu()), sampler=BatchOrder(order), batch_size=None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def summary(self) -> dict:
        return {**super().summary(), "class_names": [self.folder_classes[c] for c in self.class_names],
                "image_folder": {"root": str(self.root), "cache_hit": self.cache_hit,
                                 "streamed": self.streamed}}
