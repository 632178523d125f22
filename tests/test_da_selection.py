"""Unsupervised domain adaptation selects on the source domain: ``strategy.validate_on=source``.

With it, ``dann`` and ``source_only`` validate (select, tune, judge convergence) on the source's
validation split; no target label — training, validation — changes anything until the test.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_cfg

from transfer_lab.errors import ConfigError
from transfer_lab.run import prepare, run

BEST_VAL = ["target.select=best_val", "target.steps=12", "target.val_check_interval=4"]


def _poisoned_run(tmp_path, strategy: str, poison: bool, monkeypatch) -> dict:
    """``run`` with every target training and validation label set to −1 when ``poison``."""
    from transfer_lab.data.datamodule import TransferDataModule

    prepare_dm = TransferDataModule.prepare

    def prepare_then_poison(self, *a, **kw):
        out = prepare_dm(self, *a, **kw)
        if poison and self.key == "target.data":
            self.y_train = torch.full_like(self.y_train, -1)
            self.y_val = torch.full_like(self.y_val, -1)
        return out

    monkeypatch.setattr(TransferDataModule, "prepare", prepare_then_poison)
    cfg = compose_cfg(f"strategy={strategy}", "strategy.validate_on=source", "target.data.noise=0.6",
                      *BEST_VAL, store=tmp_path / "store")
    return run(cfg, tmp_path / "out")


@pytest.mark.parametrize("strategy", ["dann", "source_only"])
def test_validate_on_source_reads_no_target_label(tmp_path, monkeypatch, one_thread, strategy):
    clean = _poisoned_run(tmp_path / "a", strategy, False, monkeypatch)
    poisoned = _poisoned_run(tmp_path / "b", strategy, True, monkeypatch)
    assert clean["status"] == poisoned["status"] == "ok"
    assert clean["selection"]["data"] == "source.data"
    assert clean["strategy_report"]["validate_on"] == "source"
    # the same checkpoint chosen on the same source-validation curve, whatever the target labels
    assert clean["selection"] == poisoned["selection"]
    assert clean["convergence"] == poisoned["convergence"]
    assert clean["metrics"]["val/acc"] == poisoned["metrics"]["val/acc"]
    # the test still reads the target's test split (its labels untouched here)
    assert clean["metrics"]["test/acc"] == poisoned["metrics"]["test/acc"]


def test_validate_on_target_is_the_default_and_reads_target_labels(tmp_path, one_thread):
    res = run(compose_cfg("strategy=source_only", *BEST_VAL, store=tmp_path / "store"), tmp_path / "out")
    assert "data" not in res["selection"] and res["strategy_report"]["validate_on"] == "target"


def test_validation_batches_use_the_validated_domains_normalisation(tmp_path, one_thread):
    """Source validation images are normalised with the source's statistics, target test
    images with the target's (each domain its own, as in training)."""
    cfg = compose_cfg("strategy=dann", "strategy.validate_on=source", "target.data.noise=0.6",
                      store=tmp_path / "store")
    p = prepare(cfg)
    dm = p.strategy.datamodule(p.target_dm, p.source_dm)
    assert dm.validate is p.source_dm and dm.evaluate is p.target_dm
    seen = {}

    class Stage:  # what PairedData reads of its trainer
        def __init__(self, validating):
            self.validating, self.sanity_checking, self.training = validating, False, False

    for validating, dm_ in ((True, p.source_dm), (False, p.target_dm)):
        dm.trainer = Stage(validating)
        x = dm_.x_val[:4] if validating else dm_.x_test[:4]
        y = torch.zeros(4, dtype=torch.long)
        seen[validating] = (dm.on_after_batch_transfer((x, y), 0)[0], dm_.on_after_batch_transfer((x, y), 0)[0])
    for got, want in seen.values():
        assert torch.equal(got, want)


@pytest.mark.parametrize("strategy", ["dann", "source_only"])
def test_a_bad_validate_on_is_one_line_before_training(tmp_path, strategy):
    with pytest.raises(ConfigError, match=r"^strategy.validate_on='labels' .*valid: target, source$"):
        prepare(compose_cfg(f"strategy={strategy}", "strategy.validate_on=labels", store=tmp_path / "store"))
