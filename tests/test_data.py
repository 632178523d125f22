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
