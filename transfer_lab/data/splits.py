"""The validation split and the label budget of a ``TransferDataModule``: which training-pool images
of each class validate, and which (and how many, after the imbalance profile) train.

Functions of the data module ``dm`` (its ``seed``, ``samples_per_class``, ``val_fraction``,
``max_val_per_class``, ``val_per_class``, ``imbalance_ratio``, ``class_names`` and ``key``);
impossible settings raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

import math

import numpy as np

from transfer_lab.errors import ConfigError


def split_indices(dm, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class: one seeded permutation. With ``val_per_class`` unset, validation comes first and
    the budget follows it; with it set, the budget comes first and validation from the end — so
    the labelled subsets (and validation sets) of one seed are nested across budgets either way."""
    k = dm.num_classes
    counts = np.bincount(y, minlength=k)
    n_val = val_counts(dm, counts)
    keep = budget_counts(dm, counts, n_val)
    from_end = dm.val_per_class is not None
    train, val = [], []
    for c in range(k):
        idx = np.flatnonzero(y == c)
        idx = idx[np.random.default_rng([dm.seed, c]).permutation(len(idx))]
        if from_end:
            train.append(idx[:keep[c]])
            val.append(idx[len(idx) - n_val[c]:])
        else:
            val.append(idx[:n_val[c]])
            train.append(idx[n_val[c]:n_val[c] + keep[c]])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def val_counts(dm, counts: np.ndarray) -> list[int]:
    """Validation images per class: fixed (``val_per_class``), tied to the label budget
    (``budget``), or a share of each class's pool capped at ``max_val_per_class``."""
    if dm.val_per_class == "budget":
        return [dm.samples_per_class] * len(counts)
    if dm.val_per_class is not None:
        return [dm.val_per_class] * len(counts)
    cap = dm.max_val_per_class if dm.max_val_per_class is not None else math.inf
    return [min(math.ceil(dm.val_fraction * n), cap) for n in counts]


def budget_counts(dm, counts: np.ndarray, n_val: list[int]) -> list[int]:
    """Training images per class after validation: the label budget, then the imbalance profile."""
    budget, k = dm.samples_per_class, len(counts)
    avail = [int(n - v) for n, v in zip(counts, n_val)]
    c = int(np.argmin(avail))
    name, need = dm.class_names[c], max(1, budget or 1)
    if dm.val_per_class is not None and need > avail[c]:
        raise ConfigError(f"{dm.key}.val_per_class={dm.val_per_class}: class {name} has {int(counts[c])} "
                          f"image(s), too few for {n_val[c]} validation + {need} training image(s); "
                          f"lower {dm.key}.val_per_class or {dm.key}.samples_per_class")
    if avail[c] < 1:
        raise ConfigError(f"{dm.key}.val_fraction={dm.val_fraction}: class {name} has no training "
                          f"images left after the validation split ({int(counts[c])} image(s), "
                          f"{n_val[c]} to validation)")
    if budget is not None and budget > avail[c]:
        raise ConfigError(f"{dm.key}.samples_per_class={budget}: class {name} "
                          f"has only {avail[c]} training images after the validation split")
    keep = [budget or a for a in avail]
    if dm.imbalance_ratio is not None and k > 1:
        n_max = min(keep)  # the profile starts from the count every class can meet
        keep = [max(1, int(n_max * dm.imbalance_ratio ** (-i / (k - 1)))) for i in range(k)]
    return keep
