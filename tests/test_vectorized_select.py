"""Schedules and ``target.select`` per seed: K vectorised seeds with a learning-rate schedule and
best-validation selection equal K separate runs wired as ``run.target_stage`` wires one (its
``Selection`` checkpoint tested, its ``ConvergenceCheck`` curve), seed by seed."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from test_vectorized import ATOL, OPT, SEEDS, cell, trainer

from transfer_lab import schedulers
from transfer_lab.convergence import ConvergenceCheck
from transfer_lab.module import TransferModule
from transfer_lab.selection import Selection
from transfer_lab.vectorized import fit_seeds
from transfer_lab.vectorized.select import SeedSelection

STEPS = {"max_steps": 18, "max_epochs": -1, "val_check_interval": 2, "check_val_every_n_epoch": None}
SCHEDULES = {"constant": schedulers.constant, "cosine": functools.partial(schedulers.cosine, warmup_fraction=0.2),
             "onecycle": schedulers.onecycle}


def separate(name, seed, schedule, select, monitor, ckpt_dir, lr):
    """One seed as ``run.target_stage`` trains it: schedule, selection callbacks, tested checkpoint."""
    strategy, model, dm = cell(name, seed)
    module = TransferModule(model, strategy, OPT, lr=lr, num_classes=dm.num_classes,
                            class_weights=dm.class_weights, scheduler=schedule)
    selection = Selection(select, "classification", ckpt_dir, monitor=monitor)
    convergence = ConvergenceCheck(selection.monitor, selection.mode)
    t = trainer(**STEPS, callbacks=[*selection.callbacks(), convergence],
                enable_checkpointing=select == "best_val")
    t.fit(module, datamodule=strategy.datamodule(dm, None))
    fitted = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith(("val/", "train/"))}
    ckpt, record = selection.chosen(t)
    if ckpt and record["value"] is not None:
        fitted[selection.monitor] = record["value"]
    tested = t.test(module, datamodule=dm, verbose=False, ckpt_path=ckpt)[0]
    return model, {**fitted, **{k: float(v) for k, v in tested.items()}}, record, convergence.history


def vectorised(name, schedule, select, monitor, lr):
    strategies, models, dms = zip(*(cell(name, s) for s in SEEDS))
    return fit_seeds(list(models), list(strategies), list(dms), OPT, lr, trainer(**STEPS),
                     scheduler=schedule, select=select, monitor=monitor)


def assert_same(name, schedule, select, monitor, lr, tmp_path):
    results = vectorised(name, SCHEDULES[schedule], select, monitor, lr)
    chosen_before_last = 0
    for seed, res in zip(SEEDS, results):
        model, metrics, record, history = separate(name, seed, SCHEDULES[schedule], select, monitor,
                                                   tmp_path / f"{seed}", lr)
        for k, want in model.state_dict().items():
            assert torch.allclose(want.double(), res.model.state_dict()[k].double(), atol=ATOL), (seed, k)
        assert metrics.keys() == res.metrics.keys()
        for k, v in metrics.items():
            assert res.metrics[k] == pytest.approx(v, abs=ATOL), (seed, k)
        assert res.selection.keys() == record.keys() and res.selection["step"] == record["step"]
        assert res.selection["value"] == pytest.approx(record["value"], abs=ATOL)
        assert [h[0] for h in res.history] == [h[0] for h in history]
        assert [x for h in res.history for x in h[1:]] == pytest.approx([x for h in history for x in h[1:]],
                                                                         abs=ATOL)
        chosen_before_last += record["step"] < STEPS["max_steps"]
    return chosen_before_last


# a rate high enough that the validation loss turns up again (best_val then picks an earlier step)
@pytest.mark.parametrize(("schedule", "select", "monitor", "lr"), [
    ("cosine", "best_val", "val/acc", 0.01), ("onecycle", "last", "val/acc", 0.01),
    ("constant", "best_val", "val/loss", 0.1)])
def test_k_vectorised_seeds_with_schedule_and_selection_equal_k_separate_runs(schedule, select, monitor, lr,
                                                                              tmp_path):
    chosen_before_last = assert_same("finetune", schedule, select, monitor, lr, tmp_path)
    # best_val must have chosen an earlier step for some seed, or the test would not tell it from last
    assert (chosen_before_last > 0) == (select == "best_val")


def test_seed_selection_keeps_each_seed_s_first_strictly_better_value():
    class Module:  # what SeedSelection reads: per-seed metrics and stacked tensors
        def __init__(self):
            self.seed_metrics = [{}, {}]
            self.stacked = type("S", (), {"seed": lambda _, k: {"w": torch.tensor([float(k)])}})()

    class Trainer:
        sanity_checking = False
        state = type("State", (), {"fn": "fit"})()
        global_step = 0

    sel, m, t = SeedSelection(2, "best_val", "val/loss"), Module(), Trainer()
    for step, losses in enumerate([(0.5, float("nan")), (0.5, 0.9), (0.4, 0.9), (0.45, 0.8)], start=1):
        t.global_step = step
        m.seed_metrics = [{"val/loss": v} for v in losses]
        sel.on_validation_end(t, m)
    # seed 0: the tie at step 2 does not replace step 1; step 3 is strictly better. Seed 1: a NaN
    # first validation is kept as the worst value (+inf for min), then the first real value wins
    assert [sel.record(k, 4)["step"] for k in range(2)] == [3, 4]
    assert [sel.record(k, 4)["value"] for k in range(2)] == [0.4, 0.8]
    restored = SeedSelection(2, "best_val", "val/loss")
    restored.load_state_dict(sel.state_dict())
    assert [restored.record(k, 9) for k in range(2)] == [sel.record(k, 9) for k in range(2)]
    assert restored.record(0, 9)["step"] == 3 and restored.best[1]["w"].item() == 1.0


@pytest.mark.slow
def test_a_resumed_group_keeps_each_seed_s_best_and_curve(tmp_path):
    def fit(**kw):
        strategies, models, dms = zip(*(cell("finetune", s) for s in SEEDS))
        ckpt = kw.pop("ckpt_path", None)
        return fit_seeds(list(models), list(strategies), list(dms), OPT, 0.1, trainer(**kw), ckpt_path=ckpt,
                         select="best_val", monitor="val/loss")

    last = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, monitor=None,
                           enable_version_counter=False)
    fit(max_epochs=3, callbacks=[last], enable_checkpointing=True)
    resumed = fit(max_epochs=6, ckpt_path=str(tmp_path / "last.ckpt"))
    straight = fit(max_epochs=6)
    # some seed's best came before the interruption: only the checkpointed best can give it back
    assert any(s.selection["step"] <= 9 for s in straight)
    for r, s in zip(resumed, straight):
        assert r.selection["step"] == s.selection["step"]
        assert r.selection["value"] == pytest.approx(s.selection["value"], abs=1e-6)
        assert [x for h in r.history for x in h] == pytest.approx([x for h in s.history for x in h], abs=1e-6)
        for k, v in s.model.state_dict().items():
            assert torch.allclose(r.model.state_dict()[k].double(), v.double(), atol=1e-6), k
