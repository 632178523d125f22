"""Data and data-option checks: bad input fails on load with one ``ConfigError`` line naming the
file or key and the fix, before anything trains.

``where`` is always the culprit as the user would type it, e.g. ``target.data.train_file=/d/x.npz``
or ``target.data.batch_size=0``.
"""

from __future__ import annotations

import math
import numbers
import pickle
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transfer_lab.errors import ConfigError

#: labels beyond this cannot pass through float64 exactly (2**53), nor int64 comfortably
MAX_LABEL = 2 ** 53
AUGMENTATIONS = ("none", "crop", "crop_flip")
LOADERS = ("memory", "torchvision")
REMEDIES = (None, "reweight", "resample", "augment")


# --- option ranges (constructors) ------------------------------------------------------------------
def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def require_int(value: Any, where: str, minimum: int, optional: bool = False) -> None:
    """``value`` an integer ≥ ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{where}={value!r}: must be an integer ≥ {minimum}")


def require_number(value: Any, where: str, low: float, high: float | None = None,
                   optional: bool = False, open_high: bool = True) -> None:
    """``value`` a finite number in ``[low, high)`` (``[low, high]`` when not ``open_high``)."""
    if value is None and optional:
        return
    above = high is not None and (value >= high if open_high else value > high)
    if not is_number(value) or not math.isfinite(value) or value < low or above:
        span = f"≥ {low}" if high is None else f"in [{low}, {high}{')' if open_high else ']'}"
        raise ConfigError(f"{where}={value!r}: must be a finite number {span}")


def check_stats(mean: Sequence[float] | None, std: Sequence[float] | None, key: str) -> None:
    """A normalisation override: both or neither, equal lengths, finite, on the [0, 1] pixel
    scale (mean in [0, 1], std in (0, 1])."""
    if mean is None and std is None:
        return
    if mean is None or std is None:
        raise ConfigError(f"{key}.mean / {key}.std: give both (one value per channel) or neither")
    for name, values in (("mean", mean), ("std", std)):
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values \
                or not all(is_number(v) and math.isfinite(v) for v in values):
            raise ConfigError(f"{key}.{name}={values!r}: expected a list of finite numbers, one per channel")
    if len(mean) != len(std):
        raise ConfigError(f"{key}.mean has {len(mean)} values, {key}.std {len(std)}: one per channel each")
    if min(std) <= 0:
        raise ConfigError(f"{key}.std={list(std)}: every value must be > 0")
    # pixels are divided by 255 before normalising, so the common 0–255-scale statistics
    # (mean=[123.675, ...]) would turn every image into a near-constant and train to chance
    for name, values, ok in (("mean", mean, lambda v: 0 <= v <= 1), ("std", std, lambda v: v <= 1)):
        if not all(ok(v) for v in values):
            raise ConfigError(f"{key}.{name}={list(values)}: statistics are in [0, 1] pixel units; "
                              "divide 0–255 values by 255 (mean in [0, 1], std in (0, 1])")


def check_options(dm: Any) -> None:
    """A ``TransferDataModule``'s options, at construction: a bad value fails before any data is read."""
    k = dm.key
    if dm.augment not in AUGMENTATIONS:
        raise ConfigError(f"{k}.augment={dm.augment!r}: valid: {', '.join(AUGMENTATIONS)}")
    if dm.loader not in LOADERS:
        raise ConfigError(f"{k}.loader={dm.loader!r}: valid: {', '.join(LOADERS)}")
    if dm.imbalance_remedy not in REMEDIES:
        raise ConfigError(f"{k}.imbalance_remedy={dm.imbalance_remedy!r}: valid: "
                          f"{', '.join(str(r).replace('None', 'null') for r in REMEDIES)}")
    if dm.imbalance_remedy == "augment" and dm.loader != "memory":
        raise ConfigError(f"{k}.imbalance_remedy=augment: needs {k}.loader=memory "
                          "(minority-class crops are batched tensor ops)")
    for name, minimum in (("batch_size", 1), ("eval_batch_size", 1), ("num_workers", 0)):
        require_int(getattr(dm, name), f"{k}.{name}", minimum)
    for name in ("samples_per_class", "channels", "image_size"):
        require_int(getattr(dm, name), f"{k}.{name}", 1, optional=True)
    require_int(dm.max_val_per_class, f"{k}.max_val_per_class", 0, optional=True)
    require_number(dm.val_fraction, f"{k}.val_fraction", 0, 1)
    require_number(dm.imbalance_ratio, f"{k}.imbalance_ratio", 1, optional=True)
    if dm.val_per_class != "budget":
        try:
            require_int(dm.val_per_class, f"{k}.val_per_class", 1, optional=True)
        except ConfigError as e:
            raise ConfigError(f"{e} (or the string budget: as many as samples_per_class)") from None
    if dm.val_per_class == "budget" and dm.samples_per_class is None:
        raise ConfigError(f"{k}.val_per_class=budget: needs {k}.samples_per_class (validation "
                          "takes as many images per class as the label budget)")


# --- files -------------------------------------------------------------------------------------------
def read_npz(path: str | Path, where: str, names: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``names`` of an ``.npz`` archive, or one line saying what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "no such file"
        raise ConfigError(f"{where}: {what}; set TRANSFER_LAB_DATA to the folder that holds the data "
                          f"arrays, or point {where.split('=')[0]} at an existing .npz")
    expect = f"expected a numpy .npz archive (np.savez) with arrays {', '.join(names)}"
    if p.stat().st_size == 0:
        raise ConfigError(f"{where}: the file is empty; {expect}")
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise ConfigError(f"{where}: not a readable .npz ({_reason(e)}); {expect}") from None
    if not isinstance(z, np.lib.npyio.NpzFile):  # a bare .npy array under an .npz name
        raise ConfigError(f"{where}: holds a single .npy array, not an archive; {expect}")
    with z:
        missing = [n for n in names if n not in z.files]
        if missing:
            raise ConfigError(f"{where}: missing array(s) {missing} (found {sorted(z.files)}); {expect}")
        out = {}
        for n in names:
            try:
                out[n] = z[n]
            except ValueError as e:  # object arrays need pickle, which is never allowed here
                raise ConfigError(f"{where}: array {n} cannot be read ({_reason(e)}); store numbers, "
                                  "not Python objects") from None
            except (OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
                raise ConfigError(f"{where}: array {n} is corrupt ({_reason(e)}); {expect}") from None
    return out


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# --- images and labels ---------------------------------------------------------------------------------
def check_labels(y: Any, where: str) -> np.ndarray:
    """Class labels as int64 ``(N,)``; integral floats are cast, anything else is refused."""
    y = np.asarray(y)
    if y.ndim != 1:
        raise ConfigError(f"{where}: y has shape {y.shape}; expected one label per row, shape (N,)")
    if y.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            raise ConfigError(f"{where}: y holds {bad.size} non-finite label(s) (row {bad[0]}: {y[bad[0]]})")
        frac = np.flatnonzero(y != np.round(y))
        if frac.size:
            raise ConfigError(f"{where}: y holds {frac.size} non-integer label(s) (row {frac[0]}: "
                              f"{y[frac[0]]}); class labels must be whole numbers")
    elif y.dtype.kind not in "iu":
        raise ConfigError(f"{where}: y is {y.dtype}; expected integer class labels")
    if y.size and np.abs(y.astype(np.float64)).max() > MAX_LABEL:
        raise ConfigError(f"{where}: y holds a label beyond ±2**53; renumber the classes")
    return y.astype(np.int64)


def check_images(x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 ``N×H×W`` or ``N×H×W×C`` (C 1 or 3), at least one row, one integer label per image."""
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ConfigError(f"{where}: x is {x.dtype}; expected uint8 pixels 0..255 "
                          "(scale and convert with x.astype(np.uint8))")
    if x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[3] not in (1, 3)):
        raise ConfigError(f"{where}: x has shape {x.shape}; expected N×H×W or N×H×W×C with C 1 or 3")
    if 0 in x.shape[1:]:
        raise ConfigError(f"{where}: x has shape {x.shape}; images need at least one pixel")
    y = check_labels(y, where)
    if len(x) == 0:
        raise ConfigError(f"{where}: no rows (x has shape {x.shape})")
    if len(x) != len(y):
        raise ConfigError(f"{where}: {len(x)} images but {len(y)} labels; x and y need one row each")
    return x, y


def check_shapes(dm: Any, xtr: np.ndarray, xte: np.ndarray) -> None:
    """Training and test images of one shape, unless channels/image_size bring both to one."""
    def native(x: np.ndarray) -> tuple[int, ...]:
        return (x.shape[3] if x.ndim == 4 else 1, *x.shape[1:3])

    (ctr, *hw_tr), (cte, *hw_te) = native(xtr), native(xte)
    if (dm.channels is None and ctr != cte) or (dm.image_size is None and hw_tr != hw_te):
        raise ConfigError(f"{dm.describe('test')}: test images are {cte}×{'×'.join(map(str, hw_te))}, "
                          f"training images {ctr}×{'×'.join(map(str, hw_tr))}; set {dm.key}.channels "
                          f"and {dm.key}.image_size to bring both to one shape")


def check_test_labels(dm: Any, y: np.ndarray, keep: list[int]) -> None:
    """Test labels ⊆ training labels (after class selection), and at least one test image."""
    if dm.classes is None:
        unseen = sorted(set(np.unique(y).tolist()) - set(keep))
        if unseen:
            raise ConfigError(f"{dm.describe('test')}: test label(s) {unseen[:5]} never occur in the "
                              f"training data; use matching files or select classes with {dm.key}.classes")
    elif not np.isin(y, keep).any():
        raise ConfigError(f"{dm.key}.classes={dm.classes}: none of these classes occurs in the test data "
                          f"({dm.describe('test')} has labels {sorted(np.unique(y).tolist())[:10]})")


# --- tables --------------------------------------------------------------------------------------------
def check_table(x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """An npz regression table: x numeric ``N×D`` (``N×…`` is flattened), y numeric ``N`` or ``N×1``."""
    x, y = np.asarray(x), np.asarray(y)
    for name, a in (("x", x), ("y", y)):
        if a.dtype.kind not in "iuf":
            raise ConfigError(f"{where}: {name} is {a.dtype}; expected numbers")
    if x.ndim == 0 or 0 in x.shape[1:]:
        raise ConfigError(f"{where}: x has shape {x.shape}; expected N rows × D features")
    if len(x) == 0:
        raise ConfigError(f"{where}: no rows (x has shape {x.shape})")
    x = x.reshape(len(x), -1)  # N×D, or N×… flattened (as before); N reads as N×1
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ConfigError(f"{where}: y has shape {y.shape}; expected one target per row, shape (N,)")
    if len(x) != len(y):
        raise ConfigError(f"{where}: {len(x)} rows of x but {len(y)} targets; one each")
    x, y = x.astype(np.float64), y.astype(np.float64)
    check_finite({**{f"x[:, {i}]": x[:, i] for i in range(x.shape[1])}, "y": y}, where)
    return x, y


def check_finite(columns: dict[str, np.ndarray], where: str, rows: np.ndarray | None = None) -> None:
    """Every value finite; else name the first column and row (``rows[i]``: the file's row number
    of value ``i``, when rows were filtered) holding NaN/inf."""
    for name, values in columns.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            first = int(rows[bad[0]] if rows is not None else bad[0])
            raise ConfigError(f"{where}: column {name} holds {bad.size} NaN/inf value(s) (first in data "
                              f"row {first}); fill or drop those rows, or leave the column out of features")
