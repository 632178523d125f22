"""The convergence check on a strategy whose loss has a term not meant to fall (``convergence_term``).

A DANN-like strategy: the task term trains to a plateau while a second term rises with the step
(as an adversarial domain term does while λ grows). Judged on the summed loss such a cell looks
stuck; judged on the declared task term it has converged. Local helpers: ``tiny_trainer`` from
tests/protocol_helpers.py; ``one_thread`` from conftest.py.
"""

from __future__ import annotations

from functools import partial

import lightning as L
import pytest
import torch

from protocol_helpers import tiny_trainer
from transfer_lab.convergence import ConvergenceCheck, judge
from transfer_lab.selection import default_monitor
from transfer_lab.strategies.base import Loss, Strategy
from transfer_lab.strategies.dann import DANN

KW = {"monitor": "val/acc", "mode": "max", "val_tol": 0.01, "loss_tol": 0.05, "min_evals": 3}


class RisingExtraTerm(Strategy):
    """The task loss plus a term that grows by 0.05 a step (no gradient: training is the task's)."""

    needs_source = False

    def __init__(self, declare: bool) -> None:
        super().__init__()
        self.convergence_term = "task" if declare else None
        self.calls = 0

    def build(self, source, target):
        return target

    def loss(self, model, batch, task_loss):
        x, y = batch
        out = model(x)
        self.calls += 1
        return Loss({"task": task_loss(out, y), "domain": out.new_tensor(0.05 * self.calls)}, out, y)


def _fit(tmp_path, strategy: Strategy, steps: int, every: int = 10) -> tuple[dict, ConvergenceCheck]:
    from transfer_lab.data import SyntheticData
    from transfer_lab.models import mlp
    from transfer_lab.module import TransferModule

    L.seed_everything(0, verbose=False)
    dm = SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=100, n_test=20, noise=0.5, batch_size=16,
                       key="target.data")
    dm.prepare()
    model = mlp(in_channels=1, image_size=8, num_classes=4, hidden=[32])
    module = TransferModule(model, strategy, partial(torch.optim.Adam, lr=1e-2), lr=1e-2, num_classes=4)
    check = ConvergenceCheck(*default_monitor("classification"))
    tiny_trainer(tmp_path, [check], max_steps=steps, val_check_interval=min(every, steps),
                 check_val_every_n_epoch=None).fit(module, datamodule=dm)
    return check.result, check


def test_judge_reads_the_series_it_is_given():
    steps = (20, 40, 60, 80, 90, 100)
    vals = [0.5, 0.8, 0.9, 0.9, 0.9, 0.9]
    task = [1.0, 0.4, 0.31, 0.30, 0.30, 0.30]
    total = [t + 0.01 * s for t, s in zip(task, steps)]  # 1.2 → 1.3: the domain term outgrows the fall
    on_task = judge(list(zip(steps, vals, task)), 100, **KW, loss_series="train/task")
    on_total = judge(list(zip(steps, vals, total)), 100, **KW)
    assert on_task["converged"] is True and on_task["loss_series"] == "train/task"
    assert "train/task" in on_task["rule"]
    assert on_total["converged"] is False and on_total["loss_series"] == "train/loss"
    assert "training loss (train/loss) barely fell" in on_total["reason"]


def test_a_declared_task_term_is_judged_when_the_other_term_rises(tmp_path, one_thread):
    declared, _ = _fit(tmp_path / "a", RisingExtraTerm(declare=True), steps=120)
    assert declared["converged"] is True, declared
    assert declared["loss_series"] == "train/task"
    # the summed loss of the same run rises: judged on it, the cell would look stuck
    summed, _ = _fit(tmp_path / "b", RisingExtraTerm(declare=False), steps=120)
    assert summed["converged"] is False and summed["loss_series"] == "train/loss"
    assert "barely fell" in summed["reason"]


def test_the_strategy_is_left_as_it_was(tmp_path, one_thread):
    strategy = RisingExtraTerm(declare=True)
    _fit(tmp_path, strategy, steps=20)
    assert "loss" not in vars(strategy)  # the check reads the step's terms: it patches nothing


@pytest.mark.parametrize("every", [1, 3])
def test_three_steps_with_a_declared_term_is_not_converged(tmp_path, one_thread, every):
    result, _ = _fit(tmp_path, RisingExtraTerm(declare=True), steps=3, every=every)
    assert result["converged"] is False and "too few" in result["reason"]
    assert result["loss_series"] == "train/task"


def test_an_undeclared_term_fails_with_one_line(tmp_path, one_thread):
    strategy = RisingExtraTerm(declare=True)
    strategy.convergence_term = "nope"
    with pytest.raises(ValueError, match="convergence_term='nope' is not one of its loss terms"):
        _fit(tmp_path, strategy, steps=3)


def test_dann_is_judged_on_its_task_term():
    assert DANN.convergence_term == "task" and Strategy.convergence_term is None
