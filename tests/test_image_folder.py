"""data=image_folder: PNG folders made here (tiny), the decode cache, the streamed path, bad input."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from transfer_lab.data.image_folder import ImageFolderData
from transfer_lab.errors import ConfigError

CLASSES = ["ant", "bee", "cat"]


def make_folder(root, n=6, size=8, test=True, grey=False, classes=CLASSES):
    """Class ``c``'s images: a level of 40·c + 30 plus seeded noise (a local helper of this file)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("test", 2)) if test else (("train", n),):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                shape = (size, size) if grey else (size, size, 3)
                px = np.clip(40 * c + 30 + rng.integers(0, 20, shape), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / split / name / f"{i}.png")
    return root


def dm(root, tmp_path, **kw):
    kw = {"cache_dir": str(tmp_path / "cache"), "val_fraction": 0.0, "batch_size": 4, **kw}
    return ImageFolderData(root=str(root), **kw).prepare()


@pytest.fixture
def opens(monkeypatch):
    """Counts PIL.Image.open calls (every decode starts with one)."""
    count = {"n": 0}
    real = Image.open

    def counting(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(Image, "open", counting)
    return count


def test_classes_from_folders_and_pixels(tmp_path):
    d = dm(make_folder(tmp_path / "f"), tmp_path)
    assert d.summary()["class_names"] == CLASSES and d.input_shape == (3, 8, 8)
    assert len(d.y_train) == 18 and len(d.y_test) == 6
    for c in range(3):  # each image decoded under its own folder's label
        level = d.x_train[d.y_train == c].float().mean().item()
        assert 40 * c + 30 <= level <= 40 * c + 50


def test_no_test_folder_is_a_fixed_stratified_split(tmp_path):
    root = make_folder(tmp_path / "f", n=10, test=False)
    a = dm(root, tmp_path, seed=0)
    b = dm(root, tmp_path, seed=5)  # the run seed does not move the test set
    assert torch.bincount(a.y_test).tolist() == [2, 2, 2]
    assert torch.equal(a.x_test, b.x_test)


def test_second_load_reads_the_cache_and_a_change_invalidates_it(tmp_path, opens):
    root = make_folder(tmp_path / "f")
    first = dm(root, tmp_path)
    assert opens["n"] > 0 and not first.cache_hit
    opens["n"] = 0
    second = dm(root, tmp_path)
    assert opens["n"] == 0 and second.cache_hit
    assert torch.equal(first.x_train, second.x_train)
    target = root / "train" / "bee" / "0.png"
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(target)
    os.utime(target, ns=(1, 1))
    third = dm(root, tmp_path)
    assert opens["n"] > 0 and not third.cache_hit
    assert (third.x_train == 250).all(dim=(1, 2, 3)).sum() == 1


@pytest.mark.parametrize("kw", [{"val_fraction": 0.2}, {"samples_per_class": 3, "imbalance_ratio": 3.0,
                                     "imbalance_remedy": "resample", "val_fraction": 0.2}])
def test_streamed_batches_equal_in_memory_batches(tmp_path, kw):
    root = make_folder(tmp_path / "f", n=10)
    mem = dm(root, tmp_path, **kw)
    st = dm(root, tmp_path, memory_budget_mb=0, num_workers=1, **kw)
    assert st.streamed and not mem.streamed and st.input_shape == mem.input_shape
    assert st.train_counts.tolist() == mem.train_counts.tolist()
    torch.testing.assert_close(st.mean, mem.mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st.std, mem.std, atol=1e-5, rtol=1e-5)
    for get in ("train_dataloader", "val_dataloader", "test_dataloader"):
        a, b = list(getattr(mem, get)()), list(getattr(st, get)())
        assert len(a) == len(b) > 0
        for (xa, ya), (xb, yb) in zip(a, b):
            assert xb.dtype == torch.uint8 and torch.equal(xa, xb) and torch.equal(ya, yb)
    idx = torch.tensor([len(mem.y_train) - 1, 0, 1])  # code that slices dm.x_train (LogME, distillation's cache)
    assert torch.equal(st.x_train[idx], mem.x_train[idx])
    assert torch.equal(torch.cat(list(st.x_test.split(4))), mem.x_test)


def test_class_subset_by_name_and_index(tmp_path):
    root = make_folder(tmp_path / "f")
    by_name = dm(root, tmp_path, classes=["cat", "ant"])
    assert by_name.summary()["class_names"] == ["cat", "ant"]
    assert by_name.x_train[by_name.y_train == 0].float().mean() > 100  # cat is label 0 now
    assert torch.equal(dm(root, tmp_path, classes=[2, 0]).x_train, by_name.x_train)
    with pytest.raises(ConfigError, match="no class folder 'dog'"):
        dm(root, tmp_path, classes=["dog"])


def test_grey_and_resize(tmp_path):
    root = make_folder(tmp_path / "f", grey=True)
    assert dm(root, tmp_path).input_shape == (1, 8, 8)
    assert dm(root, tmp_path, channels=3, image_size=4).input_shape == (3, 4, 4)
    rgb = dm(make_folder(tmp_path / "g"), tmp_path, channels=1)
    assert rgb.input_shape == (1, 8, 8)


def test_corrupt_and_truncated_png_named_in_one_line(tmp_path):
    root = make_folder(tmp_path / "f")
    bad = root / "train" / "cat" / "3.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ConfigError) as e:
        dm(root, tmp_path)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    good = (root / "train" / "cat" / "2.png").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(ConfigError, match=r"cannot read image .*3\.png"):
        dm(root, tmp_path)


def test_bad_layouts_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="no .*train directory"):
        dm(tmp_path / "missing", tmp_path)
    root = make_folder(tmp_path / "f")
    (root / "train" / "dog").mkdir()
    with pytest.raises(ConfigError, match="only in train: \\['dog'\\]"):
        dm(root, tmp_path)
    (root / "test" / "dog").mkdir()
    with pytest.raises(ConfigError, match="train/dog/ holds no images"):
        dm(root, tmp_path)
    odd = make_folder(tmp_path / "g")
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(odd / "train" / "ant" / "x.png")
    with pytest.raises(ConfigError, match="not all one square size"):
        dm(odd, tmp_path)
