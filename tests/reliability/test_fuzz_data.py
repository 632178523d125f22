"""Property tests over data shaping: whatever the classes, budget, imbalance, validation share
and channel/size adaptation, ``prepare`` either raises one clear ``ConfigError`` line or returns
data whose shapes, labels and counts are consistent with the request."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from transfer_lab.data import NpzData, SyntheticData
from transfer_lab.errors import ConfigError

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def shaping(draw):
    k = draw(st.integers(1, 6))
    native_c = draw(st.sampled_from([1, 3]))
    classes = draw(st.none() | st.lists(st.integers(-1, k), min_size=0, max_size=k + 1))
    return dict(
        num_classes=k, shape=(native_c, draw(st.integers(2, 12)), draw(st.integers(2, 12))),
        n_train=draw(st.integers(1, 24)), n_test=draw(st.integers(1, 4)), classes=classes,
        samples_per_class=draw(st.none() | st.integers(-1, 30)),
        imbalance_ratio=draw(st.none() | st.floats(0.5, 50)),
        imbalance_remedy=draw(st.sampled_from([None, "reweight", "resample", "bogus"])),
        val_fraction=draw(st.sampled_from([0.0, 0.1, 0.5, 0.95, 1.0])),
        max_val_per_class=draw(st.none() | st.integers(0, 5)),
        channels=draw(st.sampled_from([None, 1, 3])), image_size=draw(st.none() | st.integers(1, 20)),
        augment=draw(st.sampled_from(["none", "crop", "crop_flip"])), seed=draw(st.integers(0, 3)))


def check_consistent(dm, kw: dict) -> None:
    c_native, h, w = kw["shape"]
    k = dm.num_classes
    expect_classes = kw["classes"] if kw["classes"] is not None else list(range(kw["num_classes"]))
    assert dm.class_names == list(expect_classes) and k == len(expect_classes)
    c = kw["channels"] or c_native
    s = kw["image_size"] or w  # native width (the adapter squares images to the width)
    for x, y in ((dm.x_train, dm.y_train), (dm.x_val, dm.y_val), (dm.x_test, dm.y_test)):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1:] == (c, s, s) == dm.input_shape
        assert y.dtype == torch.long and len(y) == len(x)
        assert len(y) == 0 or (0 <= int(y.min()) and int(y.max()) < k)
    counts = np.bincount(dm.y_train.numpy(), minlength=k)
    assert counts.tolist() == dm.train_counts.tolist()
    if counts.min(initial=1) == 0:  # a known gap (see test_class_without_training_images_...):
        return                      # NaN class weights and empty batches follow from it
    if kw["samples_per_class"] is not None and kw["imbalance_ratio"] is None:
        assert (counts == kw["samples_per_class"]).all()
    if kw["imbalance_ratio"] is not None and k > 1:
        assert all(a >= b for a, b in zip(counts, counts[1:])), f"not long-tailed: {counts}"
    if kw["max_val_per_class"] is not None:
        assert np.bincount(dm.y_val.numpy(), minlength=k).max(initial=0) <= kw["max_val_per_class"]
    if dm.class_weights is not None:
        assert torch.isfinite(dm.class_weights).all() and abs(float(dm.class_weights.mean()) - 1) < 1e-5
    batch = dm.transform(dm.x_train[:4], train=True)
    assert batch.dtype == torch.float32 and batch.shape == (min(4, len(dm.x_train)), c, s, s)
    assert torch.isfinite(batch).all()


@FUZZ
@given(kw=shaping())
def test_synthetic_shaping_is_consistent_or_a_clear_error(kw):
    try:
        dm = SyntheticData(**kw).prepare()
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("data.")
        event(f"ConfigError {str(e).split(':')[0].split('=')[0]}")
        return
    event("prepared")
    check_consistent(dm, kw)


def test_class_without_training_images_is_a_config_error():
    with pytest.raises(ConfigError, match="val_fraction"):
        SyntheticData(num_classes=2, n_train=1, n_test=1, val_fraction=0.5).prepare()


@st.composite
def npz_arrays(draw):
    """Valid arrays most of the time, else exactly one fault (dtype, rank, length, names)."""
    n = draw(st.integers(1, 30))
    fault = draw(st.sampled_from(["none"] * 5 + ["dtype", "rank", "length", "names"]))
    hw = draw(st.integers(1, 9))
    shape = draw(st.sampled_from([(n, hw, hw), (n, hw, hw, 3), (n, hw, hw, 1)]))
    if fault == "rank":
        shape = draw(st.sampled_from([(n, hw), (n, hw, hw, 3, 1)]))
    dtype = draw(st.sampled_from([np.float32, np.int64])) if fault == "dtype" else np.uint8
    # negative labels must be refused (see also test_negative_labels_are_rejected below)
    labels = draw(st.lists(st.integers(-1, 3), min_size=n, max_size=n)
                  | st.lists(st.integers(0, 300), min_size=n, max_size=n))
    x = np.zeros(shape, dtype=dtype) + np.arange(n).reshape(-1, *[1] * (len(shape) - 1)).astype(dtype)
    y = np.asarray(labels[: n - 1 if fault == "length" else n], dtype=np.int64)
    return x, y, ("images", "y") if fault == "names" else ("x", "y")


@FUZZ
@given(arrays=npz_arrays(), budget=st.none() | st.integers(1, 2), size=st.none() | st.integers(2, 8))
def test_npz_files_of_any_shape_load_consistently_or_fail_clearly(tmp_path_factory, arrays, budget, size):
    x, y, keys = arrays
    d = tmp_path_factory.mktemp("npz")
    np.savez(d / "train.npz", **dict(zip(keys, (x, y))))
    np.savez(d / "test.npz", **dict(zip(keys, (x, y))))
    dm = NpzData(str(d / "train.npz"), str(d / "test.npz"), samples_per_class=budget,
                 image_size=size, val_fraction=0.0, key="target.data")
    try:
        dm.prepare()
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("target.data")
        event("ConfigError")
        return
    event("prepared")
    assert x.dtype == np.uint8 and x.ndim in (3, 4) and len(x) == len(y)
    k = dm.num_classes
    assert dm.class_names == sorted(set(y.tolist()))
    assert dm.x_train.shape[1:] == dm.input_shape and dm.input_shape[-1] == (size or x.shape[2])
    assert 0 <= int(dm.y_train.min()) and int(dm.y_train.max()) < k
    # every image (its pixels hold its row number) keeps its own label through the remapping
    rows = dm.x_train.reshape(len(dm.x_train), -1)[:, 0].long()
    names = torch.as_tensor(dm.class_names)
    assert torch.equal(names[dm.y_train], torch.as_tensor(y)[rows])


def test_negative_labels_are_rejected(tmp_path):
    x = np.arange(8, dtype=np.uint8).repeat(16).reshape(8, 4, 4)
    y = np.array([-1, 0, 1, 2] * 2)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    with pytest.raises(ConfigError, match="label"):
        dm = NpzData(str(tmp_path / "d.npz"), str(tmp_path / "d.npz"), val_fraction=0.0,
                     key="target.data").prepare()
        rows = dm.x_train[:, 0, 0, 0].long()
        assert torch.equal(torch.as_tensor(dm.class_names)[dm.y_train], torch.as_tensor(y)[rows])


# --- npz contents: any dtype, shape, NaN/inf, empty or garbage file --------------------------------------
DTYPES = [np.uint8, np.int8, np.int32, np.int64, np.uint64, np.float16, np.float32, np.float64, np.bool_,
          np.complex64, "U2", object]


@st.composite
def arrays_of_any_kind(draw, rows: int):
    """An array that is sometimes right (uint8 images / int labels), often not."""
    dtype = draw(st.sampled_from(DTYPES))
    rank = draw(st.integers(0, 5))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=rank, max_size=rank)))
    if rank and draw(st.booleans()):
        shape = (rows, *shape[1:])  # usually as many rows as the other array
    n = int(np.prod(shape))
    values = np.asarray(draw(st.lists(st.sampled_from([0, 1, 2, 3, 2.5, -1, 255, np.nan, np.inf]),
                                      min_size=n, max_size=n)), dtype=np.float64).reshape(shape)
    if dtype is object:
        return np.array([None] * n, dtype=object).reshape(shape)
    with np.errstate(invalid="ignore", over="ignore"):
        return values.astype(dtype) if dtype != "U2" else values.astype(str)


@st.composite
def npz_files(draw):
    """Bytes of a file named .npz: a valid pair, odd arrays, missing arrays, empty or garbage."""
    kind = draw(st.sampled_from(["pair", "pair", "pair", "table", "odd", "empty", "garbage", "npy"]))
    rows = draw(st.integers(0, 12))
    if kind == "empty":
        return b""
    if kind == "garbage":
        return draw(st.binary(min_size=1, max_size=64))
    buf = io.BytesIO()
    if kind == "pair":
        side = draw(st.integers(1, 6))
        x = np.arange(rows * side * side, dtype=np.uint8).reshape(rows, side, side)
        y = draw(st.sampled_from([np.int64, np.float32, np.uint8]))
        labels = np.asarray(draw(st.lists(st.integers(0, 3), min_size=rows, max_size=rows)))
        arrays = {"x": x, "y": labels.astype(y)}
        if draw(st.integers(0, 2)) == 0:  # one field replaced by something odd
            arrays[draw(st.sampled_from(["x", "y"]))] = draw(arrays_of_any_kind(rows))
    elif kind == "table":  # float features and target, now and then a NaN or inf
        d = draw(st.integers(0, 3))
        cell = st.floats(-1e3, 1e3) | st.sampled_from([np.nan, np.inf, -np.inf])
        x = np.asarray(draw(st.lists(cell, min_size=rows * d, max_size=rows * d)), dtype=np.float64)
        y = np.asarray(draw(st.lists(cell, min_size=rows, max_size=rows)), dtype=np.float64)
        arrays = {"x": x.reshape(rows, d), "y": y.astype(draw(st.sampled_from([np.float32, np.float64])))}
    elif kind == "odd":
        names = draw(st.lists(st.sampled_from(["x", "y", "z"]), unique=True, max_size=3))
        arrays = {k: draw(arrays_of_any_kind(rows)) for k in names}
    else:
        np.save(buf, draw(arrays_of_any_kind(rows)), allow_pickle=True)
        return buf.getvalue()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _prepared_or_config_error(make):
    try:
        return make().prepare()
    except ConfigError as e:
        assert "\n" not in str(e) and str(e).startswith("target.data"), str(e)
        event(f"ConfigError: {str(e).split(': ', 1)[1][:30]}")
        return None


@FUZZ
@given(train=npz_files(), test=st.none() | npz_files(), budget=st.none() | st.integers(1, 2))
def test_npz_contents_load_into_a_consistent_module_or_raise_config_error(tmp_path_factory, train, test, budget):
    d = tmp_path_factory.mktemp("npz")
    (d / "train.npz").write_bytes(train)
    (d / "test.npz").write_bytes(train if test is None else test)  # None: the same file
    dm = _prepared_or_config_error(lambda: NpzData(str(d / "train.npz"), str(d / "test.npz"), val_fraction=0.0,
                                                   samples_per_class=budget, key="target.data"))
    if dm is None:
        return
    event("prepared")
    with np.load(d / "train.npz") as z:
        y_file = z["y"]
    assert set(dm.class_names) == set(np.unique(y_file).astype(np.int64).tolist())
    for x, y in ((dm.x_train, dm.y_train), (dm.x_test, dm.y_test)):
        assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1:] == dm.input_shape and len(x) == len(y) > 0
        assert y.dtype == torch.long and 0 <= int(y.min()) and int(y.max()) < dm.num_classes
    assert torch.isfinite(dm.transform(dm.x_train, train=False)).all()


@FUZZ
@given(train=npz_files())
def test_npz_tables_load_finite_or_raise_config_error(tmp_path_factory, train):
    from transfer_lab.data.tables import TableData

    path = tmp_path_factory.mktemp("table") / "t.npz"
    path.write_bytes(train)
    dm = _prepared_or_config_error(lambda: TableData(train_file=str(path), test_fraction=0.5, val_fraction=0.0,
                                                     key="target.data"))
    if dm is None:
        return
    event("prepared")
    for x in (dm.x_train, dm.x_test):
        assert x.dtype == torch.float32 and torch.isfinite(x).all() and torch.isfinite(dm.transform(x, False)).all()
    assert torch.isfinite(dm.y_train).all() and torch.isfinite(dm.y_test).all()
