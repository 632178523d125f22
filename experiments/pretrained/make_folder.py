"""Write CIFAR-10 (JPEG copy) classes 5–9 as an image folder: ``<out>/{train,test}/<class>/*.png``.

The study's target data, in torchvision's ``ImageFolder`` layout, so the run reads it with
``data@target.data=image_folder`` exactly as it would read someone's own photos. Train images come
from ``cifar10_jpeg_train20k.npz`` (the source is pretrained on classes 0–4 of the same file, so no
image is shared), test images from ``cifar10_jpeg_test.npz`` (sorted by class: drawn at random).

    python experiments/pretrained/make_folder.py [--out DIR] [--train-per-class 150] [--test-per-class 200]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
HERE = Path(__file__).resolve().parent


def pick(y: np.ndarray, cls: int, n: int, rng: np.random.Generator, where: str) -> np.ndarray:
    idx = np.flatnonzero(y == cls)
    if len(idx) < n:
        sys.exit(f"{where}: class {cls} has {len(idx)} images, fewer than the {n} asked for")
    return np.sort(rng.choice(idx, size=n, replace=False))


def write_split(x: np.ndarray, y: np.ndarray, out: Path, classes: list[int], n: int,
                rng: np.random.Generator, where: str) -> None:
    for cls in classes:
        folder = out / CIFAR10[cls]
        folder.mkdir(parents=True, exist_ok=True)
        for i in pick(y, cls, n, rng, where):  # the array index names the file: traceable to the npz
            Image.fromarray(x[i]).save(folder / f"{i:05d}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=HERE / "cifar5_9", help="folder to write (default: %(default)s)")
    p.add_argument("--data-dir", type=Path, default=Path(os.environ.get("TRANSFER_LAB_DATA", "data")))
    p.add_argument("--classes", type=int, nargs="+", default=[5, 6, 7, 8, 9])
    p.add_argument("--train-per-class", type=int, default=150,
                   help="training pool per class: the label budgets and the validation split are drawn from it")
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if (a.out / "train").exists():
        sys.exit(f"{a.out}/train exists: remove the folder first (the run's cache keys on its files)")
    rng = np.random.default_rng(a.seed)
    train = np.load(a.data_dir / "cifar10_jpeg_train20k.npz")
    write_split(train["x"], train["y"], a.out / "train", a.classes, a.train_per_class, rng,
                "cifar10_jpeg_train20k.npz")
    test_file = a.data_dir / "cifar10_jpeg_test.npz"
    if test_file.is_file():  # without it, image_folder draws its own stratified test split
        test = np.load(test_file)
        write_split(test["x"], test["y"], a.out / "test", a.classes, a.test_per_class, rng, test_file.name)
    n = sum(1 for _ in a.out.rglob("*.png"))
    print(f"{a.out}: {n} PNGs, classes {[CIFAR10[c] for c in a.classes]}")


if __name__ == "__main__":
    main()
