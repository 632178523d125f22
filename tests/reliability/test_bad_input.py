"""Issue 12, items 3 and 4: every bad data file and every out-of-range option fails on load or at
construction with one ``ConfigError`` line naming the file/key — before anything trains.

Local helpers (not in conftest.py): ``images``/``write`` build the npz files each case corrupts.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import compose_cfg
from transfer_lab.data import EmbeddedMNIST, NpzData, SyntheticData
from transfer_lab.data.tables import TableData
from transfer_lab.errors import ConfigError
from transfer_lab.validate import validate_config


def images(n: int = 12, k: int = 3, shape: tuple[int, ...] = (6, 6)) -> dict[str, np.ndarray]:
    x = np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)
    return {"x": x, "y": np.arange(n) % k}


def write(path: Path, arrays: dict | None = None, raw: bytes | None = None) -> Path:
    if raw is not None:
        path.write_bytes(raw)
    else:
        np.savez(path, **arrays)
    return path


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


# --- image npz files: the training file is bad, the test file fine --------------------------------------
def _npy(path: Path) -> Path:
    with path.open("wb") as f:
        np.save(f, images()["x"])
    return path


BAD_TRAIN = {
    "empty file": (lambda p: write(p, raw=b""), "the file is empty"),
    "text file": (lambda p: write(p, raw=b"x,y\n1,2\n"), "not a readable .npz"),
    "truncated zip": (lambda p: write(p, raw=b"PK\x03\x04" + b"\0" * 20), "not a readable .npz"),
    "bare npy": (_npy, "holds a single .npy array, not an archive"),
    "missing x": (lambda p: write(p, {"images": images()["x"], "y": images()["y"]}),
                  "missing array(s) ['x'] (found ['images', 'y'])"),
    "missing y": (lambda p: write(p, {"x": images()["x"]}), "missing array(s) ['y'] (found ['x'])"),
    "object x": (lambda p: write(p, {"x": np.array([[1], "a"], dtype=object), "y": [0, 1]}),
                 "array x cannot be read"),
    "float x": (lambda p: write(p, {**images(), "x": images()["x"].astype(np.float32)}),
                "x is float32; expected uint8"),
    "x rank 2": (lambda p: write(p, {**images(), "x": images()["x"].reshape(12, -1)}), "x has shape (12, 36)"),
    "x 4 channels": (lambda p: write(p, {**images(shape=(6, 6, 4))}), "x has shape (12, 6, 6, 4)"),
    "x zero-size images": (lambda p: write(p, {**images(shape=(0, 6))}), "images need at least one pixel"),
    "2-D y": (lambda p: write(p, {**images(), "y": (np.arange(12) % 3).reshape(12, 1)}),
              "y has shape (12, 1); expected one label per row"),
    "zero rows": (lambda p: write(p, {"x": np.zeros((0, 6, 6), np.uint8), "y": np.zeros(0, np.int64)}),
                  "no rows"),
    "fractional labels": (lambda p: write(p, {**images(), "y": np.arange(12) % 3 + 0.5}),
                          "non-integer label(s) (row 0: 0.5)"),
    "NaN labels": (lambda p: write(p, {**images(), "y": np.where(np.arange(12) == 4, np.nan, 1.0)}),
                   "non-finite label(s) (row 4: nan)"),
    "string labels": (lambda p: write(p, {**images(), "y": np.array(list("abcabcabcabc"))}),
                      "y is <U1; expected integer class labels"),
    "bool labels": (lambda p: write(p, {**images(), "y": np.arange(12) % 2 == 0}), "y is bool"),
    "length mismatch": (lambda p: write(p, {**images(), "y": np.arange(11) % 3}), "12 images but 11 labels"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN))
def test_bad_npz_file_is_one_line_naming_the_file(tmp_path, case):
    make, expect = BAD_TRAIN[case]
    bad = make(tmp_path / "train.npz")
    good = write(tmp_path / "test.npz", images())
    with pytest.raises(ConfigError) as e:
        NpzData(str(bad), str(good), key="target.data").prepare()
    msg = one_line(e)
    assert msg.startswith(f"target.data.train_file={bad}: ") and expect in msg, msg


def test_missing_npz_names_the_file_and_the_data_folder_variable(tmp_path):
    good = write(tmp_path / "train.npz", images())
    with pytest.raises(ConfigError) as e:
        NpzData(str(good), str(tmp_path / "mnist_test.npz"), key="source.data").prepare()
    msg = one_line(e)
    assert f"source.data.test_file={tmp_path}/mnist_test.npz: no such file" in msg
    assert "set TRANSFER_LAB_DATA to the folder that holds the data arrays" in msg


def test_integral_float_labels_are_cast_exactly(tmp_path):
    arrays = images()
    ints = NpzData(str(write(tmp_path / "a.npz", arrays)), str(write(tmp_path / "b.npz", arrays)),
                   val_fraction=0).prepare()
    floats = {**arrays, "y": arrays["y"].astype(np.float32)}
    cast = NpzData(str(write(tmp_path / "c.npz", floats)), str(write(tmp_path / "d.npz", floats)),
                   val_fraction=0).prepare()
    assert cast.class_names == ints.class_names == [0, 1, 2]
    assert cast.y_train.tolist() == ints.y_train.tolist() and cast.y_test.tolist() == ints.y_test.tolist()


# --- test labels against training labels ------------------------------------------------------------
@pytest.mark.parametrize("test_labels, classes, expect", [
    ([0, 1, 2, 7], None, "test label(s) [7] never occur in the training data"),
    ([3, 4, 5], [0, 1], "target.data.classes=[0, 1]: none of these classes occurs in the test data"),
])
def test_test_labels_outside_training_fail_on_load(tmp_path, test_labels, classes, expect):
    tr = write(tmp_path / "tr.npz", images(k=3))
    n = len(test_labels) * 2
    te = write(tmp_path / "te.npz", {"x": images(n=n)["x"], "y": np.array(test_labels * 2)})
    with pytest.raises(ConfigError) as e:
        NpzData(str(tr), str(te), classes=classes, key="target.data").prepare()
    assert expect in one_line(e)


# --- regression tables ------------------------------------------------------------------------------
def _csv(path: Path, rows: list[str]) -> Path:
    path.write_text("x0,x1,extra,y\n" + "\n".join(rows) + "\n")
    return path


GOOD_ROWS = [f"{i},{i % 3},{i * 2},{i * 0.5}" for i in range(20)]
BAD_TABLES = {
    "csv NaN feature": (lambda p: _csv(p.with_suffix(".csv"), GOOD_ROWS[:5] + ["5,nan,1,2"] + GOOD_ROWS[6:]),
                        "column 'x1' holds 1 NaN/inf value(s) (first in data row 5)"),
    "csv NaN target": (lambda p: _csv(p.with_suffix(".csv"), GOOD_ROWS[:3] + ["3,1,1,nan"] + GOOD_ROWS[4:]),
                       "column 'y' (the target) holds 1 NaN/inf"),
    "csv inf feature": (lambda p: _csv(p.with_suffix(".csv"), ["0,inf,1,2"] + GOOD_ROWS[1:]), "column 'x1'"),
    "npz NaN in x": (lambda p: write(p, {"x": np.where(np.eye(20, 4) > 0, np.nan, 1.0), "y": np.arange(20.0)}),
                     "column x[:, 0] holds 1 NaN/inf value(s) (first in data row 0)"),
    "npz inf in y": (lambda p: write(p, {"x": np.ones((20, 3)), "y": np.r_[np.arange(19.0), np.inf]}),
                     "column y holds 1 NaN/inf value(s) (first in data row 19)"),
    "npz empty file": (lambda p: write(p, raw=b""), "the file is empty"),
    "npz text file": (lambda p: write(p, raw=b"hello"), "not a readable .npz"),
    "npz object x": (lambda p: write(p, {"x": np.array([None] * 20, dtype=object), "y": np.arange(20.0)}),
                     "array x cannot be read"),
    "npz zero rows": (lambda p: write(p, {"x": np.ones((0, 3)), "y": np.ones(0)}), "no rows"),
    "npz string x": (lambda p: write(p, {"x": np.array([["a"]] * 20), "y": np.arange(20.0)}), "x is <U1"),
    "npz 2-D y": (lambda p: write(p, {"x": np.ones((20, 3)), "y": np.ones((20, 2))}), "y has shape (20, 2)"),
    "npz length mismatch": (lambda p: write(p, {"x": np.ones((20, 3)), "y": np.ones(19)}), "20 rows of x but 19"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_bad_table_is_one_line_naming_the_file(tmp_path, case):
    make, expect = BAD_TABLES[case]
    path = make(tmp_path / "table.npz")
    with pytest.raises(ConfigError) as e:
        TableData(train_file=str(path), key="target.data").prepare()
    msg = one_line(e)
    assert msg.startswith(f"target.data.train_file={path}: ") and expect in msg, msg


def test_nan_in_a_column_the_table_does_not_use_is_fine(tmp_path):
    path = _csv(tmp_path / "t.csv", [r if i != 4 else "4,1,nan,2" for i, r in enumerate(GOOD_ROWS)])
    dm = TableData(train_file=str(path), features=["x0", "x1"], val_fraction=0).prepare()
    assert dm.feature_names == ["x0", "x1"] and len(dm.y_train) == 16


# --- data options: ranges at construction ------------------------------------------------------------------
@pytest.mark.parametrize("option, value, expect", [
    ("batch_size", 0, "target.data.batch_size=0: must be an integer ≥ 1"),
    ("batch_size", -4, "target.data.batch_size=-4: must be an integer ≥ 1"),
    ("batch_size", 2.5, "target.data.batch_size=2.5: must be an integer ≥ 1"),
    ("eval_batch_size", 0, "target.data.eval_batch_size=0: must be an integer ≥ 1"),
    ("channels", 0, "target.data.channels=0: must be an integer ≥ 1"),
    ("channels", -3, "target.data.channels=-3: must be an integer ≥ 1"),
    ("image_size", 0, "target.data.image_size=0: must be an integer ≥ 1"),
    ("samples_per_class", 0, "target.data.samples_per_class=0: must be an integer ≥ 1"),
    ("num_workers", -1, "target.data.num_workers=-1: must be an integer ≥ 0"),
    ("max_val_per_class", -1, "target.data.max_val_per_class=-1: must be an integer ≥ 0"),
    ("val_fraction", 1.0, "target.data.val_fraction=1.0: must be a finite number in [0, 1)"),
    ("val_fraction", float("nan"), "target.data.val_fraction=nan: must be a finite number in [0, 1)"),
    ("val_fraction", -0.1, "target.data.val_fraction=-0.1"),
    ("imbalance_ratio", float("nan"), "target.data.imbalance_ratio=nan: must be a finite number ≥ 1"),
    ("imbalance_ratio", float("inf"), "target.data.imbalance_ratio=inf"),
    ("val_per_class", 0, "target.data.val_per_class=0: must be an integer ≥ 1 (or the string budget"),
    ("val_per_class", "some", "target.data.val_per_class='some'"),
    ("val_per_class", "budget", "target.data.val_per_class=budget: needs target.data.samples_per_class"),
    ("mean", [0.5], "target.data.mean / target.data.std: give both"),
])
def test_data_option_out_of_range_fails_at_construction(option, value, expect):
    with pytest.raises(ConfigError) as e:
        SyntheticData(key="target.data", **{option: value})
    assert expect in one_line(e)


@pytest.mark.parametrize("kw, expect", [
    (dict(n_train=0), "target.data.n_train=0: must be an integer ≥ 1"),
    (dict(test_fraction=1.0), "target.data.test_fraction=1.0"),
    (dict(test_fraction=float("nan")), "target.data.test_fraction=nan"),
    (dict(batch_size=0), "target.data.batch_size=0"),
    (dict(mean=[0.0], std=[1.0]), "target.data.mean: not used by a regression table"),
    (dict(val_per_class=5), "target.data.val_per_class: not used by a regression table"),
])
def test_table_option_out_of_range_fails_at_construction(kw, expect):
    with pytest.raises(ConfigError) as e:
        TableData(train_file="embedded:boston_housing", key="target.data", **kw)
    assert expect in one_line(e)


@pytest.mark.parametrize("make, expect", [
    (lambda: EmbeddedMNIST(train_per_class=500, key="source.data"),
     "source.data.train_per_class=500: must be an integer in 1..499"),
    (lambda: EmbeddedMNIST(train_per_class=0, key="source.data"), "source.data.train_per_class=0"),
    (lambda: SyntheticData(n_train=0, key="source.data"), "source.data.n_train=0: must be an integer ≥ 1"),
    (lambda: SyntheticData(num_classes=0, key="source.data"), "source.data.num_classes=0"),
    (lambda: SyntheticData(shape=(2, 8, 8), key="source.data"), "source.data.shape=[2, 8, 8]: expected [C, H, W]"),
    (lambda: SyntheticData(noise=float("nan"), key="source.data"), "source.data.noise=nan"),
])
def test_source_specific_options_out_of_range_fail_at_construction(make, expect):
    with pytest.raises(ConfigError) as e:
        make()
    assert expect in one_line(e)


# --- run-level options: validate_config ------------------------------------------------------------------
@pytest.mark.parametrize("overrides, expect", [
    (["target.optimizer.lr=nan"], "target.optimizer.lr=nan"),
    (["source.optimizer.lr=inf"], "source.optimizer.lr=inf: must be a finite number > 0"),
    (["target.optimizer.lr=0"], "target.optimizer.lr=0: must be a finite number > 0"),
    (["target.optimizer.weight_decay=nan"], "target.optimizer.weight_decay=nan: not a number"),
    (["source.model.channels=[-8,16]"], "source.model.channels=[-8, 16]: sizes must be integers ≥ 1"),
    (["model@source.model=mlp", "source.model.hidden=[0]"], "source.model.hidden=[0]: sizes must be"),
    (["model@source.model=resnet_cifar", "source.model.width=-16"], "source.model.width=-16"),
])
def test_run_option_out_of_range_is_one_line(overrides, expect):
    with pytest.raises(ConfigError) as e:
        validate_config(compose_cfg(*overrides))
    assert expect in one_line(e)


@pytest.mark.parametrize("overrides", [
    ["model@target.model=mlp", "target.model.dropout=0"],  # Hydra parses 0 as an int
    ["model@target.model=resnet18", "target.model.mean=[0,0,0]", "target.model.std=[1,1,1]"],
    ["model@target.model=mlp", "target.model.hidden=[4]", "target.model.batch_norm=true"],
])
def test_model_options_that_are_not_sizes_may_be_zero(overrides):
    """Only what a factory annotates as a count (int, or a sequence of ints) must be ≥ 1."""
    validate_config(compose_cfg(*overrides))


# --- through run(): each fails before the source stage trains (the store stays empty) -------------------
def _npz_pair(tmp_path: Path, bad: str) -> list[str]:
    tr = write(tmp_path / "tr.npz", images(n=24, k=3, shape=(16, 16)))
    te = write(tmp_path / "te.npz", images(n=12, k=3, shape=(16, 16)))
    if bad == "empty":
        write(tr, raw=b"")
    elif bad == "unseen":  # the test file holds classes 5..7 only
        write(te, {"x": images(n=12, shape=(16, 16))["x"], "y": 5 + np.arange(12) % 3})
    return ["data@target.data=npz", f"target.data.train_file={tr}", f"target.data.test_file={te}"]


@pytest.mark.parametrize("overrides, expect", [
    (["target.data.eval_batch_size=0"], "target.data.eval_batch_size=0: must be an integer ≥ 1"),
    (["source.data.batch_size=-1"], "source.data.batch_size=-1: must be an integer ≥ 1"),
    (["target.data.image_size=0"], "target.data.image_size=0"),
    (["target.optimizer.lr=nan"], "target.optimizer.lr=nan"),
    (["source.optimizer.lr=inf"], "source.optimizer.lr=inf"),
    (["source.model.channels=[-8,16]"], "source.model.channels=[-8, 16]"),
    ("empty", "the file is empty"),
    ("unseen", "test label(s) [5, 6, 7] never occur in the training data"),
])
def test_bad_input_through_run_fails_before_the_source_trains(tmp_path, overrides, expect):
    from transfer_lab.run import run

    if isinstance(overrides, str):
        overrides = _npz_pair(tmp_path, overrides)
    store = tmp_path / "store"
    cfg = compose_cfg("source.epochs=1", "target.epochs=1", *overrides, store=store)
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path / "out")
    assert expect in one_line(e)
    assert not store.exists() or not any(store.rglob("*.safetensors")) and not any(store.rglob("manifest.json"))


@pytest.mark.slow
@pytest.mark.parametrize("bad", ["lr", "empty"])
def test_command_line_exits_2_with_one_line_and_trains_nothing(tmp_path, bad):
    import os
    import subprocess
    import sys

    from conftest import ROOT

    args = ["target.optimizer.lr=nan"] if bad == "lr" else _npz_pair(tmp_path, "empty")
    env = {**os.environ, "TRANSFER_LAB_STORE": str(tmp_path / "store")}
    proc = subprocess.run([sys.executable, "-m", "transfer_lab.train", f"hydra.run.dir={tmp_path}/r",
                           "data@source.data=synthetic", "model@source.model=tiny_cnn", *args],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: target.") and not (tmp_path / "store").exists()
