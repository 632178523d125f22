"""Train K seeds of one cell as one vectorised model and hand back K ordinary results."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import lightning as L
import torch
from torch import nn

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.schedulers import ScheduleFactory
from transfer_lab.strategies.base import Strategy
from transfer_lab.vectorized.data import NotVectorisable, StackedDataModule
from transfer_lab.vectorized.module import VectorizedModule
from transfer_lab.vectorized.select import SeedCurves, SeedSelection
from transfer_lab.vectorized.terms import vectorizable


@dataclass
class SeedResult:
    """What one seed's separate run would have: its trained model (the object passed in, trained
    in place), its metrics under the separate run's keys, and per-class test accuracy."""

    model: nn.Module
    metrics: dict[str, float] = field(default_factory=dict)
    per_class: list[float] | None = None
    #: ``(step, val/acc, epoch-mean training loss)`` at every validation: the convergence check's input
    history: list[tuple[int, float, float | None]] = field(default_factory=list)
    #: the ``results.json`` ``selection`` entry (``Selection.chosen``'s keys): what was tested
    selection: dict = field(default_factory=dict)


def check_group(strategies: list[Strategy], dms: list[TransferDataModule],
                optimizer: Callable | None = None) -> None:
    """Raise ``NotVectorisable`` (naming why) unless these K seeds can train as one model."""
    if len(strategies) != len(dms) or not strategies:
        raise NotVectorisable(f"{len(strategies)} strategies for {len(dms)} data modules")
    if len({type(s) for s in strategies}) != 1:
        raise NotVectorisable("the seeds use different strategies")
    task = getattr(dms[0], "task", "classification")
    ok, why = vectorizable(strategies[0], optimizer, task)
    if not ok:
        raise NotVectorisable(why)
    if len({dm.num_classes for dm in dms}) != 1:
        raise NotVectorisable("the seeds' targets have different numbers of classes")


def fit_seeds(models: list[nn.Module], strategies: list[Strategy], dms: list[TransferDataModule],
              optimizer: Callable[..., torch.optim.Optimizer], lr: float, trainer: L.Trainer,
              scheduler: ScheduleFactory | None = None, test: bool = True,
              source_dms: list[TransferDataModule | None] | None = None,
              ckpt_path: str | None = None, select: str = "last",
              monitor: str = "val/acc", mode: str = "auto") -> list[SeedResult]:
    """Fit (and test) K seeds as one ``VectorizedModule`` on ``trainer``; returns per-seed results.

    ``models[k]`` is ``strategies[k].build(source_k, target_k)`` of seed k, ``dms[k]`` its target
    data module (prepared). Each strategy's ``datamodule`` hook is called (it records facts, e.g.
    distill's normalisations) but its return value is not used: the engine feeds the plain target
    batches. Raises ``NotVectorisable`` before any training when the group cannot be stacked.
    ``scheduler``: a schedule factory (``builders.schedule_factory``), as ``TransferModule`` takes.
    ``select``/``monitor``: ``target.select`` per seed (``best_val``: each seed is tested, and its
    model left, with its own best-validation weights).
    """
    check_group(strategies, dms, optimizer)
    for k, (s, dm) in enumerate(zip(strategies, dms)):
        s.datamodule(dm, (source_dms or [None] * len(dms))[k])
        if hasattr(s, "cache_info"):  # distill: the teacher runs inside the vectorised step
            s.cache_info = {"used": False, "reason": "vectorised seeds: the teacher runs per step"}
    data = StackedDataModule(dms)
    module = VectorizedModule(models, strategies, optimizer, lr, dms[0].num_classes,
                              class_weights=[dm.class_weights for dm in dms], scheduler=scheduler,
                              mode=mode)
    selection = SeedSelection(len(models), select, monitor)
    trainer.callbacks.extend([selection, SeedCurves(monitor)])  # restored from ckpt_path with the module
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    selection.restore(module)
    for k, metrics in enumerate(module.seed_metrics):
        value = selection.chosen_value(k)
        if value is not None:  # the tested model's validation figure, as run.run records it
            metrics[selection.monitor] = value
    if test:
        trainer.test(module, datamodule=data, verbose=False)
    module.unstack()
    return [SeedResult(m, dict(module.seed_metrics[k]), module.test_per_class[k], module.history[k],
                       selection.record(k, int(trainer.global_step)))
            for k, m in enumerate(models)]
