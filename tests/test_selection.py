"""Selection on validation (``target.select``, ``target.early_stopping``): alone with a module whose
validation metric peaks at a known step, and wired into the run (transfer_lab.run.target_stage).

Local helpers (``Walker``, ``tiny_trainer``, ``tiny_loader``) live in tests/protocol_helpers.py.
"""

from __future__ import annotations

import lightning as L
import pytest

from protocol_helpers import Walker, tiny_loader, tiny_trainer
from transfer_lab.errors import ConfigError
from transfer_lab.selection import Selection, default_monitor


def _select(tmp_path, select: str, early_stopping=None, max_steps: int = 10):
    sel = Selection(select, "classification", tmp_path / "ckpt", early_stopping)
    module, trainer = Walker(peak=5.0), tiny_trainer(tmp_path, sel.callbacks(), max_steps=max_steps)
    trainer.fit(module, tiny_loader(), tiny_loader(1))
    path, record = sel.chosen(trainer)
    tested = trainer.test(module, tiny_loader(1), ckpt_path=path, verbose=False)[0]
    return record, tested, trainer


def test_best_val_tests_the_peak_checkpoint_and_records_its_step(tmp_path):
    record, tested, _ = _select(tmp_path, "best_val")
    assert record == {"select": "best_val", "monitor": "val/acc", "mode": "max", "step": 5, "value": 0.0}
    assert tested["test/w"] == pytest.approx(5.0)  # the peak's weights, not the last (10)


def test_last_tests_the_final_weights(tmp_path):
    record, tested, _ = _select(tmp_path, "last")
    assert record["step"] == 10 and record["value"] == pytest.approx(-25.0)
    assert tested["test/w"] == pytest.approx(10.0)


def test_early_stopping_ends_after_patience_validations(tmp_path):
    record, tested, trainer = _select(tmp_path, "best_val", {"patience": 2, "min_delta": 0.0}, max_steps=50)
    assert trainer.global_step == 7  # best at 5, two worse validations (6, 7), stop
    assert record["step"] == 5 and tested["test/w"] == pytest.approx(5.0)


def test_selection_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="target.select='best'"):
        Selection("best", "classification", tmp_path)
    with pytest.raises(ConfigError, match="never a test one"):
        Selection("best_val", "classification", tmp_path, monitor="test/acc")
    with pytest.raises(ConfigError, match="target.early_stopping.patiense"):
        Selection("last", "classification", tmp_path, {"patiense": 3})
    assert default_monitor("regression") == ("val/loss", "min")
    assert Selection("best_val", "regression", tmp_path).checkpoint.mode == "min"

# --- wired into the run (transfer_lab.run.target_stage) -------------------------------------------
def test_run_tests_the_best_val_checkpoint_and_records_selection_and_convergence(tmp_path, monkeypatch):
    """One batch per epoch and validation every 3 steps (an int interval larger than an epoch's
    batches); best_val tests best.ckpt, results.json holds the step chosen and its val/acc, which
    is also what optimized_metric hands a sweeper; then resume state is gone."""
    import csv

    from conftest import compose_cfg
    from transfer_lab.run import run
    from transfer_lab.train import objective

    tested_on = []
    original = L.Trainer.test

    def spy(self, *args, **kwargs):
        tested_on.append(kwargs.get("ckpt_path"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "test", spy)
    cfg = compose_cfg("strategy=scratch", "target.steps=12", "target.val_check_interval=3",
                      "target.data.batch_size=1000", "target.select=best_val", "optimized_metric=val/acc",
                      "scheduler@target.scheduler=cosine", store=tmp_path / "store")
    res = run(cfg, tmp_path / "cell")
    sel = res["selection"]
    assert tested_on[-1].endswith("best.ckpt") and sel["select"] == "best_val" and sel["monitor"] == "val/acc"
    with open(tmp_path / "cell" / "target" / "metrics.csv") as f:
        logged = {int(r["step"]) + 1: float(r["val/acc"]) for r in csv.DictReader(f) if r.get("val/acc")}
    assert sorted(logged) == [3, 6, 9, 12] and res["target_training"]["epochs"] == 12
    assert sel["step"] in logged and sel["value"] == pytest.approx(max(logged.values()))
    assert logged[sel["step"]] == pytest.approx(sel["value"])
    assert objective(cfg, res) == res["metrics"]["val/acc"] == sel["value"]
    assert res["convergence"]["n_evals"] == 4 and isinstance(res["convergence"]["converged"], bool)
    assert not (tmp_path / "cell" / "checkpoints").exists()


def test_a_three_step_run_is_not_converged_and_last_tests_the_final_weights(tmp_path):
    from conftest import compose_cfg
    from transfer_lab.run import run

    res = run(compose_cfg("strategy=scratch", "target.steps=3", "target.val_check_interval=1",
                          store=tmp_path / "store"), tmp_path / "cell")
    assert res["convergence"]["converged"] is False and "too few" in res["convergence"]["reason"]
    assert res["selection"] == {"select": "last", "monitor": "val/acc", "mode": "max", "step": 3,
                                "value": res["metrics"]["val/acc"]}


@pytest.mark.parametrize("override, culprit", [
    ("target.early_stopping={patience:0}", "target.early_stopping"),
    ("target.monitor=test/acc", "target.monitor='test/acc'"),
    ("+target.early_stopping.patiense=3", "target.early_stopping.patiense"),
])
def test_bad_selection_settings_fail_before_training(tmp_path, override, culprit):
    from conftest import compose_cfg
    from transfer_lab.run import run

    with pytest.raises(ConfigError, match=culprit.replace(".", r"\.")):
        run(compose_cfg("strategy=finetune", override, store=tmp_path / "store"), tmp_path / "cell")
    assert not (tmp_path / "store").exists()
