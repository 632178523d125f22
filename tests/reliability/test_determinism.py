"""Determinism: one config + seed on CPU gives identical metrics and weights twice; the label
budget subset and the class split depend only on the seed (not on batch sizes, loaders or the
global random state)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from transfer_lab.data import SyntheticData
from transfer_lab.io import sha256_file
from transfer_lab.run import run


@pytest.mark.slow
def test_same_config_and_seed_give_identical_results(tmp_path):
    """Two full runs, each training its own source (separate stores), then fine-tuning."""
    results = []
    for name in ("a", "b"):
        torch.manual_seed(1234 if name == "a" else 99)  # stray global state must not matter
        np.random.seed(7 if name == "a" else 8)
        cfg = compose_cfg("strategy=finetune", "seed=3", "target.save_weights=full",
                          store=tmp_path / f"store_{name}")
        results.append(run(cfg, tmp_path / name))
    a, b = results
    assert a["source"]["cache_hit"] is False and b["source"]["cache_hit"] is False
    assert a["source"]["key"] == b["source"]["key"]
    assert a["source"]["test/acc"] == b["source"]["test/acc"]
    assert a["metrics"] == b["metrics"]
    # bit-equal results need the same CPU thread count: every result records it
    assert a["env"]["threads"] == torch.get_num_threads() and a["env"]["job_threads"] is None
    assert sha256_file(tmp_path / "a" / "target.safetensors") == sha256_file(tmp_path / "b" / "target.safetensors")
    assert (sha256_file(tmp_path / "store_a" / a["source"]["key"] / "model.safetensors")
            == sha256_file(tmp_path / "store_b" / b["source"]["key"] / "model.safetensors"))


@pytest.fixture
def shaped(synth):
    """``shaped(seed, **kw)``: 3 of 5 classes, 6 labels each, a 20% validation split."""
    def make(seed: int, **kw) -> SyntheticData:
        return synth(**{**dict(num_classes=5, shape=(1, 8, 8), n_train=40, n_test=8, classes=[4, 0, 2],
                               samples_per_class=6, val_fraction=0.2, seed=seed), **kw})

    return make


def test_budget_subset_and_class_split_depend_only_on_the_seed(shaped):
    ref = shaped(0)
    torch.manual_seed(5)
    np.random.seed(5)
    for other in (shaped(0, batch_size=7, eval_batch_size=3, augment="crop"),
                  shaped(0, loader="torchvision", device_resident=False)):
        assert torch.equal(other.x_train, ref.x_train) and torch.equal(other.y_train, ref.y_train)
        assert torch.equal(other.x_val, ref.x_val) and torch.equal(other.y_val, ref.y_val)
    assert ref.class_names == [4, 0, 2] and ref.train_counts.tolist() == [6, 6, 6]
    assert not torch.equal(shaped(1).x_train, ref.x_train), "the seed does not change the subset"


def _rows(dm: SyntheticData) -> set[bytes]:
    return {bytes(x.numpy().tobytes()) for x in dm.x_train}


@pytest.mark.parametrize("seed", [0, 1])
def test_budgets_are_nested_and_validation_is_budget_independent(seed, shaped):
    """A larger budget keeps every image of a smaller one; the validation split never moves."""
    small, large = shaped(seed, samples_per_class=3), shaped(seed, samples_per_class=9)
    assert _rows(small) <= _rows(large)
    assert torch.equal(small.x_val, large.x_val)
    assert not (_rows(small) & {bytes(x.numpy().tobytes()) for x in small.x_val})
