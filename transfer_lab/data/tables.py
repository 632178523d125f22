"""Feature tables for regression transfer (house prices → salaries style): CSV or npz, float.

A table is N rows of D numeric features and one numeric target. Rows are held as float32
``(N, D, 1, 1)`` tensors, so the ``mlp`` backbone (which flattens ``C·H·W``) takes them with
``in_channels = D`` and ``image_size = 1``; ``num_classes`` is the number of outputs (1).
Features are standardised with the statistics of all training-side rows (not the test rows); the
target is kept in its own units (optionally ``log1p``-transformed) so RMSE reads in those units.

This is the data half of the regression task type; the loss and metrics (MSE on the standardised
target; MSE, RMSE, R² in the target's units) live in ``TransferModule(task="regression")``.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from transfer_lab.data.checks import check_finite, check_table, read_npz, require_int, require_number
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError


BOSTON_COLUMNS = ["CRIM", "ZN", "INDUS", "CHAS", "NOX", "RM", "AGE", "DIS", "RAD", "TAX", "PTRATIO",
                  "B", "LSTAT"]
OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
       "!=": np.not_equal}


def embedded_table(name: str, key: str) -> tuple[dict[str, np.ndarray], str]:
    """Real tables that ship inside installed packages (no network): ``embedded:boston_housing`` —
    the 506 Boston census tracts of Harrison & Rubinfeld (1978) from ``mlxtend``, 13 features,
    target ``MEDV`` (median home value, $1000s)."""
    if name != "boston_housing":
        raise ConfigError(f"{key}=embedded:{name}: unknown embedded table; valid: embedded:boston_housing")
    from mlxtend.data import boston_housing_data

    x, y = boston_housing_data()
    return {**{c: x[:, i].astype(np.float64) for i, c in enumerate(BOSTON_COLUMNS)},
            "MEDV": y.astype(np.float64)}, "MEDV"


def read_table(path: str | Path, target: str, features: Sequence[str] | None,
               key: str, where: Sequence | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(x float64 N×D, y float64 N, feature names)`` from a headed CSV, an npz (x, y) or an
    embedded table (``embedded:<name>``); ``where=[column, op, value]`` keeps matching rows."""
    if str(path).startswith("embedded:"):
        cols, default_target = embedded_table(str(path).split(":", 1)[1], key)
        return _columns(cols, target if target != "y" else default_target, features, key, where, str(path))
    p = Path(path)
    if p.suffix == ".npz":
        if where is not None:
            raise ConfigError(f"{key}={path}: where= needs named columns (a CSV or an embedded table)")
        arrays = read_npz(p, f"{key}={path}", ("x", "y"))
        x, y = check_table(arrays["x"], arrays["y"], f"{key}={path}")
        names = list(features) if features else [f"x{i}" for i in range(x.shape[1])]
        if len(names) != x.shape[1]:
            raise ConfigError(f"{key}={path}: {len(names)} feature name(s) for {x.shape[1]} column(s) of x")
        return x, y, names
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file (a CSV with a header row, or an npz "
                          "with arrays x float N×D and y float N)")
    try:
        with p.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise ConfigError(f"{key}={path}: not a readable CSV ({type(e).__name__}: {e})") from None
    if not rows:
        raise ConfigError(f"{key}={path}: empty table")
    try:
        cols = {c: np.array([float(r[c]) for r in rows]) for c in rows[0]}
    except (ValueError, TypeError) as e:  # TypeError: a short row (None for the missing cells)
        raise ConfigError(f"{key}={path}: non-numeric or missing value ({e})") from None
    return _columns(cols, target, features, key, where, str(path))


def _columns(cols: dict[str, np.ndarray], target: str, features: Sequence[str] | None, key: str,
             where: Sequence | None, path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    if target not in cols:
        raise ConfigError(f"{key}: target column {target!r} not in {path} (columns: {', '.join(cols)})")
    names = list(features) if features else [c for c in cols if c != target]
    missing = [c for c in names if c not in cols]
    if missing:
        raise ConfigError(f"{key}: feature column(s) {missing} not in {path}")
    mask = np.ones(len(cols[target]), dtype=bool)
    if where is not None:
        at = f"{key.rsplit('.', 1)[0]}.where={list(where)}"  # the data config's key, not the file's
        if len(where) != 3 or where[0] not in cols or where[1] not in OPS:
            raise ConfigError(f"{at}: expected [column, op, value] with op one of {', '.join(OPS)} "
                              f"and a column of {path}")
        try:
            value = float(where[2])
        except (TypeError, ValueError):
            raise ConfigError(f"{at}: the value must be a number") from None
        mask = OPS[where[1]](cols[where[0]], value)
        if not mask.any():
            raise ConfigError(f"{at}: no row of {path} matches")
    rows = np.flatnonzero(mask)
    check_finite({**{f"{c!r}": cols[c][mask] for c in names}, f"{target!r} (the target)": cols[target][mask]},
                 f"{key}={path}", rows)
    x = np.stack([cols[c][mask] for c in names], axis=1)
    return x, cols[target][mask], names


class TableData(TransferDataModule):
    """A regression table as a data module (``_target_: transfer_lab.data.tables.TableData``).

    Args:
        train_file: CSV (header row) or npz table.
        test_file: a separate test table; None: hold out ``test_fraction`` of ``train_file``.
        target: the target column (CSV).
        features: feature columns (None: every other column).
        test_fraction: share of rows held out for testing when there is no ``test_file``.
        n_train: label budget, training rows drawn seeded (None: all).
        where: keep only rows with ``[column, op, value]`` (op ``<``, ``<=``, ``>``, ``>=``, ``==``,
            ``!=``), applied to both files — one table split into two domains.
        log_target: model ``log1p(y)`` (prices, salaries: errors become relative).
        standardize_target: the model predicts ``(y − mean) / std`` of the training rows
            (``target_norm``); metrics are still computed in the target's units. Without it a
            small MLP spends its first hundreds of steps learning the offset and fits far worse
            (Boston MEDV: test R² −0.2 vs 0.8 for the same 64-64 MLP).
        val_fraction, batch_size, eval_batch_size, seed, key: as for every data module.
    """

    #: what the training module should optimise and report (MSE loss; R², RMSE)
    task = "regression"

    def __init__(self, train_file: str, test_file: str | None = None, target: str = "y",
                 features: Sequence[str] | None = None, test_fraction: float = 0.2,
                 n_train: int | None = None, log_target: bool = False, where: Sequence | None = None,
                 standardize_target: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        unused = [k for k in ("mean", "std", "val_per_class") if kwargs.get(k) is not None]
        if unused:
            raise ConfigError(f"{self.key}.{unused[0]}: not used by a regression table (features are "
                              f"standardised with the training rows; validation is val_fraction)")
        require_int(n_train, f"{self.key}.n_train", 1, optional=True)
        require_number(test_fraction, f"{self.key}.test_fraction", 0, 1)
        self.train_file, self.test_file, self.target = train_file, test_file, target
        self.features, self.test_fraction = features, test_fraction
        self.n_train, self.log_target = n_train, log_target
        self.where = list(where) if where is not None else None
        self.standardize_target = standardize_target
        self.target_norm: tuple[float, float] = (0.0, 1.0)

    def prepare(self) -> TableData:
        if self._ready:
            return self
        key = self.key
        x, y, self.feature_names = read_table(self.train_file, self.target, self.features,
                                              f"{key}.train_file", self.where)
        rng = np.random.default_rng(self.seed)
        if self.test_file:
            xte, yte, _ = read_table(self.test_file, self.target, self.feature_names, f"{key}.test_file",
                                     self.where)
        else:
            perm = np.random.default_rng(0).permutation(len(y))  # a fixed split, like a dataset's
            n_test = int(round(self.test_fraction * len(y)))
            xte, yte, x, y = x[perm[:n_test]], y[perm[:n_test]], x[perm[n_test:]], y[perm[n_test:]]
        perm = rng.permutation(len(y))
        n_val = int(np.ceil(self.val_fraction * len(y)))
        val, train = perm[:n_val], perm[n_val:]
        # R² needs two rows to have a variance; an empty validation split is fine (none is run)
        if n_val == 1:
            raise ConfigError(f"{key}.val_fraction={self.val_fraction}: leaves 1 row for validation; "
                              "R² needs at least 2 (or set it to 0)")
        if len(yte) < 2:
            where_test = f"test_file={self.test_file}" if self.test_file else f"test_fraction={self.test_fraction}"
            raise ConfigError(f"{key}.{where_test}: leaves {len(yte)} row(s) for testing; R² needs at least 2")
        if self.n_train is not None:
            if self.n_train > len(train):
                raise ConfigError(f"{key}.n_train={self.n_train}: only {len(train)} training rows")
            train = train[:self.n_train]
        if self.log_target:
            if (y < 0).any() or (yte < 0).any():
                raise ConfigError(f"{key}.log_target=true: the target has negative values")
            y, yte = np.log1p(y), np.log1p(yte)
        if self.standardize_target:
            self.target_norm = (float(y[train].mean()), float(max(y[train].std(), 1e-6)))
        # feature statistics from every training-side row (labels are not needed for them, as the
        # image modules take channel statistics from the unlabelled pool): with a budget of 20
        # rows a rare binary feature can be constant, and its std would blow test rows up
        pool = x[perm]
        std = pool.std(0)
        self.mean = torch.as_tensor(pool.mean(0), dtype=torch.float32)
        self.std = torch.as_tensor(np.where(std > 1e-8, std, 1.0), dtype=torch.float32)
        as_x = lambda a: torch.as_tensor(a, dtype=torch.float32).reshape(len(a), x.shape[1], 1, 1)  # noqa: E731
        as_y = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        self.x_train, self.y_train = as_x(x[train]), as_y(y[train])
        self.x_val, self.y_val = as_x(x[val]), as_y(y[val])
        self.x_test, self.y_test = as_x(xte), as_y(yte)
        self.class_names = [self.target]  # one output
        self.train_counts = np.array([len(train)])
        self._ready = True
        return self

    def input_files(self) -> list[str]:
        # an embedded table ships inside an installed package
        return [f for f in (self.train_file, self.test_file) if f and not str(f).startswith("embedded:")]

    @property
    def class_weights(self) -> None:
        return None

    def transform(self, x: torch.Tensor, train: bool, y: torch.Tensor | None = None) -> torch.Tensor:
        """Standardise features with the training rows' mean and std."""
        return (x - self.mean.to(x.device).view(1, -1, 1, 1)) / self.std.to(x.device).view(1, -1, 1, 1)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        x, y = batch
        return self.transform(x, False), y

    def summary(self) -> dict:
        return {"task": "regression", "target": self.target, "features": self.feature_names,
                "input_shape": list(self.input_shape), "n_train": len(self.y_train),
                "n_val": len(self.y_val), "n_test": len(self.y_test)}


def synthetic_table(path: str | Path, n: int = 500, d: int = 8, task_seed: int = 0,
                    shift: float = 0.0, noise: float = 0.1, seed: int = 0) -> Path:
    """Write a learnable CSV regression table: y = tanh(x·w₁)·w₂ + noise, weights from
    ``task_seed``; ``shift`` mixes in a second task's weights (0: same task, 1: unrelated), so
    a related source/target pair is two tables with shift 0 and e.g. 0.3."""
    w1 = np.random.default_rng(task_seed).standard_normal((d, 16))
    w2 = np.random.default_rng(task_seed + 1).standard_normal(16)
    other = np.random.default_rng(task_seed + 100).standard_normal((d, 16))
    w1 = (1 - shift) * w1 + shift * other
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.tanh(x @ w1 / np.sqrt(d)) @ w2 + noise * rng.standard_normal(n)
    path = Path(path)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*(f"x{i}" for i in range(d)), "y"])
        w.writerows([*row, t] for row, t in zip(x.round(6), y.round(6)))
    return path
