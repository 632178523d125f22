"""Trials in one process reuse the prepared data (``transfer_lab.data.prepared_cache``): the same
tensors as preparing afresh, each trial its own module, a changed input or setting is a miss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import compose_cfg
from test_image_folder import make_folder
from transfer_lab.data import NpzData, SyntheticData
from transfer_lab.data import prepared_cache as pc
from transfer_lab.data.image_folder import ImageFolderData
from transfer_lab.data.tables import TableData, synthetic_table
from transfer_lab.errors import ConfigError
from transfer_lab.run import prepare, run

SPLITS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    monkeypatch.delenv("TRANSFER_LAB_DATA_CACHE_MB", raising=False)
    pc.clear()
    yield
    pc.clear()


def write_npz(path, n_per_class: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    np.savez(path, x=rng.integers(0, 256, (len(y), 8, 8), dtype=np.uint8), y=y)
    return str(path)


def npz_module(tmp_path, **kw) -> NpzData:
    train, test = tmp_path / "train.npz", tmp_path / "test.npz"
    if not train.exists():
        write_npz(train, 20, 0), write_npz(test, 5, 1)
    return NpzData(str(train), str(test), **{"samples_per_class": 4, "seed": 3, **kw})


def assert_same_data(a, b) -> None:
    for name in SPLITS:
        assert torch.equal(getattr(a, name)[:], getattr(b, name)[:]), name  # [:]: streamed images too
    facts = [dm.summary() for dm in (a, b)]
    for f in facts:  # whether the decoded folder was on disk already: not the data
        f.get("image_folder", {}).pop("cache_hit", None)
    assert facts[0] == facts[1]


@pytest.mark.parametrize("kind", ["npz", "synthetic", "table"])
def test_cached_prepare_gives_the_tensors_of_a_fresh_prepare(tmp_path, kind):
    table = str(synthetic_table(tmp_path / "t.csv", n=80))
    make = {"npz": lambda: npz_module(tmp_path, imbalance_ratio=2.0, image_size=12, channels=3),
            "synthetic": lambda: SyntheticData(n_train=30, n_test=10, samples_per_class=5, seed=2),
            "table": lambda: TableData(table, n_train=20, seed=1)}[kind]
    fresh = make().prepare()
    first, second = pc.prepare_cached(make()), pc.prepare_cached(make())
    assert pc.counts == {"hits": 1, "misses": 1, "uncacheable": 0}
    assert_same_data(fresh, first)
    assert_same_data(fresh, second)
    # the reuse is the point: the second module holds the first one's tensors, not a copy
    assert second.x_train.data_ptr() == first.x_train.data_ptr()


@pytest.mark.parametrize("budget_mb", [1024, 0])  # in memory; streamed from the decoded file
def test_image_folder_reuse_and_a_new_image_is_a_miss(tmp_path, budget_mb):
    root = make_folder(tmp_path / "f", n=8)

    def make():
        return ImageFolderData(root=str(root), cache_dir=str(tmp_path / "cache"), classes=["cat", "ant"],
                               memory_budget_mb=budget_mb, samples_per_class=3, val_fraction=0.5, seed=1)
    fresh = make().prepare()
    first, second = pc.prepare_cached(make()), pc.prepare_cached(make())
    assert pc.counts["hits"] == 1 and second.streamed is (budget_mb == 0)
    assert_same_data(fresh, first)
    assert_same_data(fresh, second)
    assert second.classes == [2, 0] and second.folder_classes == ["ant", "bee", "cat"]
    make_folder(tmp_path / "f", n=9)  # one more image per class
    again = pc.prepare_cached(make())
    assert pc.counts["misses"] == 2 and len(again.y_val) == len(fresh.y_val) + 2  # 4 → 5 per class
    assert_same_data(again, make().prepare())


def test_each_trial_gets_its_own_module(tmp_path):
    first = pc.prepare_cached(npz_module(tmp_path, batch_size=4))
    second = pc.prepare_cached(npz_module(tmp_path, batch_size=7))  # loader settings: still a hit
    assert pc.counts["hits"] == 1 and second is not first
    assert second.batch_size == 7 and next(iter(second.train_dataloader()))[0].shape[0] == 7
    second.class_names.append(99)  # a run changing its module's state leaves the others alone
    second.train_counts = second.train_counts * 0
    third = pc.prepare_cached(npz_module(tmp_path))
    assert third.class_names == first.class_names == [0, 1, 2]
    assert third.train_counts.sum() == first.train_counts.sum() == 12


def test_a_different_seed_setting_or_file_is_a_miss(tmp_path):
    base = pc.prepare_cached(npz_module(tmp_path))
    other_seed = pc.prepare_cached(npz_module(tmp_path, seed=4))
    other_budget = pc.prepare_cached(npz_module(tmp_path, samples_per_class=2))
    assert pc.counts["misses"] == 3
    assert not torch.equal(base.x_train, other_seed.x_train) and len(other_budget.y_train) == 6
    write_npz(tmp_path / "train.npz", 20, 7)  # the same path, new content
    rewritten = pc.prepare_cached(npz_module(tmp_path))
    assert pc.counts["misses"] == 4
    assert_same_data(rewritten, npz_module(tmp_path).prepare())
    assert not torch.equal(rewritten.x_train, base.x_train)


def test_off_switch_and_modules_that_do_not_name_their_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_LAB_DATA_CACHE_MB", "0")
    a, b = pc.prepare_cached(npz_module(tmp_path)), pc.prepare_cached(npz_module(tmp_path))
    assert a.x_train.data_ptr() != b.x_train.data_ptr() and pc.counts["hits"] == 0
    monkeypatch.delenv("TRANSFER_LAB_DATA_CACHE_MB")
    loads = []

    class Unnamed(SyntheticData):  # a user's module: input_files() is unknown (None)
        def input_files(self):
            return None

        def load_arrays(self):
            loads.append(1)
            return super().load_arrays()

    for _ in range(2):
        pc.prepare_cached(Unnamed(samples_per_class=3))
    assert len(loads) == 2 and pc.counts["uncacheable"] == 2
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv("TRANSFER_LAB_DATA_CACHE_MB", bad)
        with pytest.raises(ConfigError, match=f"TRANSFER_LAB_DATA_CACHE_MB={bad}: expected megabytes"):
            pc.prepare_cached(npz_module(tmp_path))


def test_budget_and_entry_bound(tmp_path, monkeypatch):
    monkeypatch.setenv("TRANSFER_LAB_DATA_CACHE_MB", str(1 / 1024))  # 1 kB: an 8x8 dataset does not fit
    pc.prepare_cached(npz_module(tmp_path)), pc.prepare_cached(npz_module(tmp_path))
    assert pc.counts == {"hits": 0, "misses": 2, "uncacheable": 0} and not pc._entries
    monkeypatch.delenv("TRANSFER_LAB_DATA_CACHE_MB")
    for seed in range(pc.MAX_ENTRIES + 1):
        pc.prepare_cached(SyntheticData(samples_per_class=3, seed=seed))
    assert len(pc._entries) == pc.MAX_ENTRIES
    pc.prepare_cached(SyntheticData(samples_per_class=3, seed=0))  # the oldest went first
    assert pc.counts["hits"] == 0
    pc.prepare_cached(SyntheticData(samples_per_class=3, seed=pc.MAX_ENTRIES))
    assert pc.counts["hits"] == 1


def test_a_patched_loader_is_not_served_an_earlier_result(monkeypatch):
    pc.prepare_cached(SyntheticData(samples_per_class=3))
    real = SyntheticData.load_arrays
    monkeypatch.setattr(SyntheticData, "load_arrays", lambda self: tuple(a[:8] for a in real(self)))
    assert len(pc.prepare_cached(SyntheticData(samples_per_class=1)).y_test) == 8


def test_prepare_of_a_cell_and_its_training_match_with_and_without_reuse(tmp_path, monkeypatch):
    """One tiny finetune cell three times in one process: data prepared afresh (off), prepared
    (miss), reused (hit) — the same prepared tensors, the same RNG after the build, the same
    results; and training leaves the shared tensors as they were."""
    cfg = compose_cfg("strategy=finetune", "target.data.samples_per_class=6", store=tmp_path / "store")
    monkeypatch.setenv("TRANSFER_LAB_DATA_CACHE_MB", "0")
    off_p = prepare(cfg)
    off = run(cfg, tmp_path / "off")
    monkeypatch.delenv("TRANSFER_LAB_DATA_CACHE_MB")
    miss = run(cfg, tmp_path / "miss")
    hit_p = prepare(cfg)
    hit = run(cfg, tmp_path / "hit")
    assert pc.counts["misses"] == 2 and pc.counts["hits"] == 4  # source + target: 1 miss, 2 hits each
    for a, b in ((off_p.source_dm, hit_p.source_dm), (off_p.target_dm, hit_p.target_dm)):
        assert_same_data(a, b)
    rng_off, rng_hit = off_p.target_rng, hit_p.target_rng
    assert rng_off["python"] == rng_hit["python"] and torch.equal(rng_off["torch"], rng_hit["torch"])
    assert np.array_equal(rng_off["numpy"][1], rng_hit["numpy"][1])
    for res in (miss, hit):
        assert res["metrics"] == off["metrics"] and res["data"] == off["data"]
        assert res["selection"] == off["selection"]
    assert any(state["x_train"] is hit_p.target_dm.x_train for state, _ in pc._entries.values())
    assert_same_data(off_p.target_dm, hit_p.target_dm)  # after two trainings over the shared tensors


@pytest.mark.slow
def test_an_optuna_study_in_one_process_reuses_the_data_and_finds_the_same(tmp_path):
    """``hparams_search=linear_probe``, 3 trials in one process, with reuse and without
    (``TRANSFER_LAB_DATA_CACHE_MB=0``): trials 2 and 3 reuse trial 1's data, and every trial's
    results and the study's best are the same either way."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT, TINY

    out = {}
    for mb in ("1024", "0"):
        sweep = tmp_path / f"mb{mb}"
        cmd = [sys.executable, "-m", "transfer_lab.train", *TINY, "hparams_search=linear_probe",
               "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}",
               f"store_dir={tmp_path}/store", "target.steps=6", "target.val_check_interval=2", "logger=none"]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**os.environ, "TRANSFER_LAB_DATA_CACHE_MB": mb})
        assert done.returncode == 0, done.stderr[-3000:]
        out[mb] = [json.loads((sweep / str(i) / "results.json").read_text()) for i in range(3)]
        reused = ["reusing the data" in (sweep / str(i) / "train.log").read_text() for i in range(3)]
        assert reused == ([False, True, True] if mb != "0" else [False] * 3)
    for on, off in zip(out["1024"], out["0"]):
        assert on["metrics"] == off["metrics"] and on["data"] == off["data"]
        assert on["config"]["target"]["optimizer"]["lr"] == off["config"]["target"]["optimizer"]["lr"]
