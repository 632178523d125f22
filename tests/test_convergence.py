"""The convergence check: ``judge`` on hand-made curves, and ``ConvergenceCheck`` on real short runs.

Local helpers: ``tiny_trainer`` from tests/protocol_helpers.py; ``one_thread`` from conftest.py.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from protocol_helpers import tiny_trainer
from transfer_lab.convergence import ConvergenceCheck, judge
from transfer_lab.selection import default_monitor


STEPS = (20, 40, 60, 80, 90, 100)
KW = {"monitor": "val/acc", "mode": "max", "val_tol": 0.01, "loss_tol": 0.05, "min_evals": 3}


def _history(vals, losses):
    return list(zip(STEPS, vals, losses))


def test_judge_a_plateau_is_converged():
    out = judge(_history([0.5, 0.8, 0.9, 0.9, 0.9, 0.9], [1.0, 0.4, 0.31, 0.30, 0.30, 0.30]), 100, **KW)
    assert out["converged"] is True and out["val_metric_change_last_fifth"] == 0
    # a memorised training set: the loss still halves (−33%), a negligible share of its whole fall
    out = judge(_history([0.5, 0.8, 0.9, 0.9, 0.9, 0.9], [1.2, 0.05, 0.004, 0.003, 0.0025, 0.002]), 100, **KW)
    assert out["converged"] is True and out["train_loss_change_last_fifth"] == pytest.approx(-1 / 3)


def test_judge_curves_still_moving_are_not_converged():
    rising = judge(_history([s / 100 for s in STEPS], [1 / s for s in STEPS]), 100, **KW)
    assert rising["converged"] is False and rising["val_metric_change_last_fifth"] == pytest.approx(0.2)
    assert rising["train_loss_change_last_fifth"] == pytest.approx(-0.2)
    # a too-low learning rate: the loss falls in a straight line, 1.5% in the last fifth
    slow = judge(_history([0.25] * 6, [1.38, 1.36, 1.34, 1.32, 1.31, 1.30]), 100, **KW)
    assert slow["converged"] is False and slow["train_loss_share_last_fifth"] == pytest.approx(0.25)
    assert "still falling" in slow["reason"]
    stuck = judge(_history([0.25] * 6, [1.39, 1.40, 1.38, 1.39, 1.385, 1.39]), 100, **KW)
    assert stuck["converged"] is False and "barely fell" in stuck["reason"]
    # min mode: a falling validation loss is an improvement
    val_loss = judge(_history([1 - s / 100 for s in STEPS], [1.0, 0.4, 0.31, 0.30, 0.30, 0.30]), 100,
                     **{**KW, "monitor": "val/loss", "mode": "min"})
    assert val_loss["converged"] is False and "val/loss still improving" in val_loss["reason"]


def test_judge_a_gain_of_exactly_val_tol_is_not_flat_whatever_the_float32_rounding():
    import numpy as np
    for before, after in [(0.63, 0.64), (0.59, 0.60)]:  # float32 differences 0.00999999 / 0.01000005
        vals = [float(np.float32(v)) for v in (0.3, 0.5, before, before, before, after)]
        out = judge(_history(vals, [1.0, 0.4, 0.31, 0.30, 0.30, 0.30]), 100, **KW)
        assert out["val_metric_change_last_fifth"] == 0.01
        assert out["converged"] is False and "still improving" in out["reason"], (before, after)


def test_judge_needs_a_curve():
    plateau = _history([0.5, 0.8, 0.9, 0.9, 0.9, 0.9], [1.0, 0.4, 0.31, 0.30, 0.30, 0.30])
    assert "too few" in judge(plateau[:2], 100, **KW)["reason"]
    one_in_last_fifth = [h for h in plateau if h[0] != 90]  # 80 → 100: one validation after the start
    assert "too few" in judge(one_in_last_fifth, 100, **KW)["reason"]


def _fit_transfer(tmp_path, steps: int, every: int = 10, lr: float = 1e-2) -> dict:
    """A real TransferModule (scratch, MLP) on synthetic data for ``steps`` optimizer steps,
    validated every ``every`` steps (at the end when the run is shorter)."""
    from transfer_lab.data import SyntheticData
    from transfer_lab.models import mlp
    from transfer_lab.module import TransferModule
    from transfer_lab.strategies.scratch import Scratch

    L.seed_everything(0, verbose=False)
    dm = SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=100, n_test=20, noise=0.5, batch_size=16,
                       key="target.data")
    dm.prepare()
    model = mlp(in_channels=1, image_size=8, num_classes=4, hidden=[32])
    module = TransferModule(model, Scratch(), partial(torch.optim.Adam, lr=lr), lr=lr, num_classes=4)
    check = ConvergenceCheck(*default_monitor("classification"))
    tiny_trainer(tmp_path, [check], max_steps=steps, val_check_interval=min(every, steps),
             check_val_every_n_epoch=None).fit(module, datamodule=dm)
    return check.result


@pytest.mark.parametrize("every", [1, 10])
def test_three_steps_is_not_converged(tmp_path, one_thread, every):
    """Validated after each step or once: three steps leave no last fifth to judge."""
    result = _fit_transfer(tmp_path, steps=3, every=every)
    assert result["converged"] is False and result["steps"] == 3 and "too few" in result["reason"]


@pytest.mark.parametrize(("lr", "why"), [(1e-4, "still falling"), (1e-5, "barely fell")])
def test_a_too_low_learning_rate_is_not_converged(tmp_path, one_thread, lr, why):
    """120 steps at a too-low rate: the loss changes by < 3% in the last fifth — flat to a tolerance
    on its value — but falls in a straight line (1e-4) or hardly at all (1e-5)."""
    result = _fit_transfer(tmp_path, steps=120, lr=lr)
    assert result["converged"] is False and why in result["reason"]
    assert abs(result["train_loss_change_last_fifth"]) < 0.03


def test_training_to_a_plateau_is_converged(tmp_path, one_thread):
    result = _fit_transfer(tmp_path, steps=120)
    assert result["converged"] is True, result
    assert result["n_evals"] == 12 and result["val_metric_change_last_fifth"] < 0.01
