"""Distillation's teacher-logit cache: same logits, same batches, same student, fewer teacher calls."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.plugins import Precision
from conftest import compose_cfg
from safetensors.torch import load_file

from transfer_lab.errors import ConfigError
from transfer_lab.builders import build_model
from transfer_lab.data.paired import PairedData, RowLoader
from transfer_lab.run import prepare, run
from transfer_lab.source_stage import source_stage
from transfer_lab.strategies.distill import Distill

# an MLP student under a tiny_cnn teacher (different architectures), 3 student epochs
DISTILL = ["strategy=distill", "model@target.model=mlp", "target.model.hidden=[16]",
           "target.epochs=3", "transferability=false", "resume=false", "target.save_weights=full"]


@pytest.fixture
def teacher_calls(monkeypatch):
    """Counts the images every teacher built by ``Distill.build`` is run on (a forward hook)."""
    counts = {"images": 0}
    build = Distill.build

    def counting_build(self, source, target):
        model = build(self, source, target)
        self.teacher.register_forward_hook(
            lambda m, inp, out: counts.__setitem__("images", counts["images"] + len(out)))
        return model

    monkeypatch.setattr(Distill, "build", counting_build)
    return counts


def _run(tmp_path, name: str, *overrides: str) -> dict:
    cfg = compose_cfg(*DISTILL, *overrides, store=tmp_path / "store")
    return run(cfg, tmp_path / name)


@pytest.mark.slow
def test_cached_and_uncached_runs_train_the_same_student(tmp_path, teacher_calls):
    """Same seed: the cached run sees the same batches and logits, so the student ends the same."""
    cached = _run(tmp_path, "cached", "strategy.cache_teacher=true")
    n_train, calls_cached = cached["data"]["target"]["n_train"], teacher_calls["images"]
    teacher_calls["images"] = 0
    plain = _run(tmp_path, "plain", "strategy.cache_teacher=false")
    assert cached["strategy_report"]["teacher_cache"]["used"]
    assert not plain["strategy_report"]["teacher_cache"]["used"]
    # one teacher forward per training image per run vs per image per epoch
    assert calls_cached == n_train
    assert teacher_calls["images"] == 3 * n_train
    a = load_file(tmp_path / "cached" / cached["weights"]["file"])
    b = load_file(tmp_path / "plain" / plain["weights"]["file"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=f"student {k} differs")
    for k in ("test/acc", "test/loss"):
        assert cached["metrics"][k] == pytest.approx(plain["metrics"][k], abs=1e-5), k


def test_cached_logits_equal_the_teachers_logits_on_the_same_batches(tmp_path):
    """Each cached batch: its images and labels are the uncached loader's, in the same order,
    and its logits are what the teacher computes on that batch (to 1e-6)."""
    cfg = compose_cfg(*DISTILL, "target.data.batch_size=7", store=tmp_path / "store")
    p = prepare(cfg)
    strategy, source_dm, target_dm = p.strategy, p.source_dm, p.target_dm
    source, _ = source_stage(cfg, strategy, source_dm)
    strategy.build(source, build_model(cfg.target.model, target_dm))
    dm = strategy.datamodule(target_dm, source_dm)
    assert isinstance(dm, PairedData) and dm.per_sample is not None

    # what setup reads from a Trainer: the device, the precision context, rank and mode
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")),
                                 precision_plugin=Precision(), global_rank=0, world_size=1,
                                 training=True)
    dm.setup("fit")
    cached, plain = dm.train_dataloader(), target_dm.train_dataloader()
    assert isinstance(cached, RowLoader) and len(cached) == len(plain)
    for epoch in (0, 2):  # a sequence of epochs: the loaders' own epoch counters advance
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for (xc, yc, tc), (xp, yp) in zip(cached, plain, strict=True):
            assert torch.equal(xc, xp) and torch.equal(yc, yp)
            xn, _ = target_dm.on_after_batch_transfer((xp, yp), 0)
            with torch.no_grad():
                expected = strategy.teacher(strategy.teacher_input(xn))
            torch.testing.assert_close(tc, expected, atol=1e-6, rtol=0)
            out = dm.on_after_batch_transfer((xc, yc, tc), 0)
            assert len(out) == 3 and out[2] is tc and torch.equal(out[0], xn)


@pytest.mark.parametrize("overrides, reason", [
    (["target.data.augment=crop"], "augment=crop"),
    (["strategy.hints=[[backbone.fc1,backbone.pool]]"], "hints"),
    (["strategy.kd_weight=0"], "kd_weight=0"),
])
@pytest.mark.slow
def test_cache_auto_disables_when_invalid(tmp_path, teacher_calls, overrides, reason):
    res = _run(tmp_path, "out", *overrides)
    info = res["strategy_report"]["teacher_cache"]
    assert not info["used"] and reason in info["reason"]
    n = res["data"]["target"]["n_train"]
    # uncached: the teacher runs on every image every epoch (not at all without a KD term/hints)
    assert teacher_calls["images"] == (0 if reason == "kd_weight=0" else 3 * n)


def test_cache_true_with_augmentation_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cache_teacher=true.*augment=crop"):
        _run(tmp_path, "out", "strategy.cache_teacher=true", "target.data.augment=crop")


def test_cache_teacher_rejects_unknown_values():
    with pytest.raises(ConfigError, match="cache_teacher"):
        Distill(cache_teacher="sometimes")
