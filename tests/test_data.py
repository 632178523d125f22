"""Data shaping: subset/remap, budget determinism, validation split, channel/size adaptation."""

import numpy as np
import pytest
import torch

from transfer_lab.data import EmbeddedMNIST, NpzData, SyntheticData, TorchvisionData
from transfer_lab.errors import ConfigError
from transfer_lab.data.loader import BatchLoader, adapt_images, random_crop


def synth(**kw):
    base = dict(num_classes=5, shape=(1, 12, 12), n_train=40, n_test=10)
    base.update(kw)
    return SyntheticData(**base).prepare()


def test_class_subset_is_remapped_in_the_given_order():
    full = synth()
    dm = synth(classes=[3, 1])
    assert dm.num_classes == 2 and set(dm.y_train.tolist()) == {0, 1}
    # images labelled 0 after remapping are exactly the original class-3 images
    x_full = full.x_test[full.y_test == 3]
    assert torch.equal(dm.x_test[dm.y_test == 0], x_full)


def test_budget_is_stratified_seeded_and_nested():
    a = synth(samples_per_class=5, seed=1)
    b = synth(samples_per_class=5, seed=1)
    c = synth(samples_per_class=5, seed=2)
    big = synth(samples_per_class=10, seed=1)
    assert np.bincount(a.y_train.numpy()).tolist() == [5] * 5
    assert torch.equal(a.x_train, b.x_train)
    assert not torch.equal(a.x_train, c.x_train)
    # the 5-label subset is contained in the 10-label subset of the same seed
    rows = {tuple(r.flatten().tolist()) for r in big.x_train}
    assert all(tuple(r.flatten().tolist()) in rows for r in a.x_train)


def test_validation_comes_from_training_side_and_is_disjoint():
    dm = synth(val_fraction=0.25)
    assert len(dm.y_val) == 5 * 10 and len(dm.y_train) == 5 * 30
    train_rows = {tuple(r.flatten().tolist()) for r in dm.x_train}
    assert not any(tuple(r.flatten().tolist()) in train_rows for r in dm.x_val)
    test_rows = {tuple(r.flatten().tolist()) for r in dm.x_test}
    assert not any(tuple(r.flatten().tolist()) in test_rows for r in dm.x_val)


def test_grey_to_rgb_and_resize_and_back():
    grey = synth(channels=3, image_size=32)
    assert grey.input_shape == (3, 32, 32)
    assert torch.equal(grey.x_train[:, 0], grey.x_train[:, 1])  # grey→RGB repeats the channel
    rgb = SyntheticData(shape=(3, 32, 32), channels=1, image_size=28).prepare()
    assert rgb.input_shape == (1, 28, 28)
    x = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    assert torch.equal(adapt_images(x, 1, 16), x)  # no-op when the shape already fits


def test_imbalance_profile_and_reweighting():
    dm = synth(imbalance_ratio=10, imbalance_remedy="reweight", val_fraction=0.0)
    counts = np.bincount(dm.y_train.numpy()).tolist()
    assert counts[0] == 40 and counts[-1] == 4 and counts == sorted(counts, reverse=True)
    w = dm.class_weights
    assert w[-1] > w[0] and torch.isclose(w.mean(), torch.tensor(1.0))


@pytest.mark.parametrize("kw, match", [
    (dict(classes=[]), "classes=\\[\\]: the class list is empty"),
    (dict(classes=[0, 9]), "classes: \\[9\\] out of range"),
    (dict(samples_per_class=1000), "samples_per_class=1000: class 0 has only 36"),
    (dict(augment="rotate"), "augment='rotate'"),
])
def test_bad_shaping_gives_one_clear_line(kw, match):
    with pytest.raises(ConfigError, match=match):
        synth(**kw)


def test_loader_covers_each_sample_once_and_shards_for_ddp():
    x = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1)
    y = torch.arange(10)
    seen = torch.cat([yb for _, yb in BatchLoader(x, y, 3, shuffle=True, seed=0)])
    assert sorted(seen.tolist()) == list(range(10))
    r0 = torch.cat([yb for _, yb in BatchLoader(x, y, 2, True, 0, rank=0, world_size=2)])
    r1 = torch.cat([yb for _, yb in BatchLoader(x, y, 2, True, 0, rank=1, world_size=2)])
    assert len(r0) == len(r1) == 5 and set(r0.tolist()) | set(r1.tolist()) == set(range(10))


def test_random_crop_shifts_content_without_changing_shape():
    x = torch.zeros(8, 1, 8, 8)
    x[:, :, 3:5, 3:5] = 1
    out = random_crop(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.all(out.sum(dim=(1, 2, 3)) <= 4)


def test_embedded_mnist_is_real_and_offline():
    dm = EmbeddedMNIST(classes=[5, 6, 7, 8, 9], samples_per_class=10).prepare()
    assert dm.input_shape == (1, 28, 28) and len(dm.y_train) == 50 and len(dm.y_test) == 500
    assert 0.1 < float(dm.mean) < 0.16  # MNIST's mean intensity is ~0.13


def test_npz_source_and_its_errors(tmp_path):
    x = np.random.default_rng(0).integers(0, 256, (20, 8, 8, 3), dtype=np.uint8)
    y = np.repeat(np.arange(4), 5).astype(np.int64)
    np.savez(tmp_path / "tr.npz", x=x, y=y)
    np.savez(tmp_path / "te.npz", x=x[:8], y=y[:8])
    dm = NpzData(str(tmp_path / "tr.npz"), str(tmp_path / "te.npz"), val_fraction=0).prepare()
    assert dm.input_shape == (3, 8, 8) and dm.num_classes == 4
    with pytest.raises(ConfigError, match="train_file=.*nope.npz: no such file"):
        NpzData(str(tmp_path / "nope.npz"), str(tmp_path / "te.npz")).prepare()
    np.savez(tmp_path / "bad.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(ConfigError, match="bad.npz: x is float32; expected uint8"):
        NpzData(str(tmp_path / "bad.npz"), str(tmp_path / "te.npz")).prepare()


def test_torchvision_missing_files_names_the_path(tmp_path):
    dm = TorchvisionData("MNIST", root=str(tmp_path), download=False, key="target.data")
    with pytest.raises(ConfigError, match=f"MNIST files not found under {tmp_path}"):
        dm.prepare()
    with pytest.raises(ConfigError, match="dataset='Imagenet'"):
        TorchvisionData("Imagenet", root=str(tmp_path))


# --- normalisation override (a pretrained model's own statistics) -----------------------------------
def test_normalisation_defaults_to_the_dataset_and_is_recorded():
    dm = synth(shape=(3, 8, 8))
    s = dm.summary()
    pool = torch.cat([dm.x_train, dm.x_val]).float() / 255  # no budget: the whole training pool
    assert s["normalization"] == "dataset"
    assert np.allclose(s["mean"], pool.mean(dim=(0, 2, 3)).tolist(), atol=1e-5)
    assert np.allclose(s["std"], pool.std(dim=(0, 2, 3)).tolist(), atol=1e-5)


def test_normalisation_override_replaces_the_statistics():
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # ImageNet's, as a timm model declares
    dm = synth(shape=(3, 8, 8), mean=mean, std=std)
    x = dm.x_test[:5]
    expect = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.allclose(dm.transform(x, train=False), expect, atol=1e-5)
    s = dm.summary()
    assert s["normalization"] == "model" and s["mean"] == mean and s["std"] == std


@pytest.mark.parametrize("kw, expect", [
    (dict(mean=[0.5], std=[0.0]), r"data.std=\[0.0\]: every value must be > 0"),
    (dict(mean=[0.5], std=[-1.0]), r"data.std=\[-1.0\]: every value must be > 0"),
    (dict(mean=[float("nan")], std=[1.0]), "data.mean=.*expected a list of finite numbers"),
    (dict(mean=[0.5], std=[float("inf")]), "data.std=.*expected a list of finite numbers"),
    (dict(mean=[0.5, 0.5], std=[1.0]), "data.mean has 2 values, data.std 1"),
    (dict(mean="0.5", std=[1.0]), "data.mean='0.5': expected a list"),
    # pixels are scaled to [0, 1] before normalising: 0–255-scale statistics must be refused
    (dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
     r"data.mean=\[123.675, 116.28, 103.53\]: statistics are in \[0, 1\] pixel units; divide 0–255 values by 255"),
    (dict(mean=[0.5], std=[58.395]), r"data.std=\[58.395\]: statistics are in \[0, 1\] pixel units"),
    (dict(mean=[-0.1], std=[0.2]), r"data.mean=\[-0.1\]: statistics are in \[0, 1\] pixel units"),
])
def test_normalisation_override_is_checked_at_construction(kw, expect):
    with pytest.raises(ConfigError, match=expect):
        SyntheticData(**kw)


def test_normalisation_override_needs_one_value_per_channel():
    with pytest.raises(ConfigError, match=r"data.mean/std: 3 values for 1-channel images"):
        synth(mean=[0.5] * 3, std=[0.25] * 3)
    assert synth(channels=3, mean=[0.5] * 3, std=[0.25] * 3).input_shape[0] == 3  # after grey→RGB


# --- validation budget tied to the label budget ---------------------------------------------------------
def rows(x: torch.Tensor) -> set:
    return {tuple(r.flatten().tolist()) for r in x}


def test_val_per_class_takes_exactly_that_many_from_outside_the_labelled_subset():
    dm = synth(samples_per_class=5, val_per_class=7)
    assert np.bincount(dm.y_val.numpy()).tolist() == [7] * 5
    assert np.bincount(dm.y_train.numpy()).tolist() == [5] * 5
    assert not rows(dm.x_val) & rows(dm.x_train)
    s = dm.summary()
    assert s["val_mode"] == "fixed" and s["val_per_class"] == 7 and s["val_counts"] == [7] * 5


def test_val_per_class_budget_matches_the_label_budget_and_stays_nested():
    small, big = synth(samples_per_class=3, val_per_class="budget"), synth(samples_per_class=8, val_per_class="budget")
    assert np.bincount(small.y_val.numpy()).tolist() == [3] * 5 and small.summary()["val_per_class"] == 3
    assert np.bincount(big.y_val.numpy()).tolist() == [8] * 5 and big.summary()["val_mode"] == "budget"
    assert rows(small.x_train) <= rows(big.x_train) and rows(small.x_val) <= rows(big.x_val)
    assert not rows(big.x_val) & rows(big.x_train)
    again = synth(samples_per_class=3, val_per_class="budget")
    assert torch.equal(again.x_train, small.x_train) and torch.equal(again.x_val, small.x_val)
    other_seed = synth(samples_per_class=3, val_per_class="budget", seed=5)
    assert not torch.equal(other_seed.x_train, small.x_train)


def test_fixed_val_per_class_keeps_one_validation_set_across_budgets():
    a, b = synth(samples_per_class=2, val_per_class=4), synth(samples_per_class=20, val_per_class=4)
    assert torch.equal(a.x_val, b.x_val) and rows(a.x_train) <= rows(b.x_train)


def test_default_validation_is_unchanged_and_recorded_as_fraction():
    dm = synth(val_fraction=0.25)
    s = dm.summary()
    assert s["val_mode"] == "fraction" and s["val_per_class"] == 10 and s["val_counts"] == [10] * 5


@pytest.mark.parametrize("kw, expect", [
    (dict(samples_per_class=30, val_per_class=20), r"data.val_per_class=20: class 0 has 40 image\(s\), too few "
                                                   r"for 20 validation \+ 30 training"),
    (dict(samples_per_class=25, val_per_class="budget"), "data.val_per_class=budget: class 0 has 40"),
    (dict(val_per_class=40), r"data.val_per_class=40: class 0 has 40 image\(s\), too few for 40 validation \+ 1"),
])
def test_val_per_class_pool_too_small_is_a_clear_error(kw, expect):
    with pytest.raises(ConfigError, match=expect):
        synth(**kw)
