"""Learning-rate schedules, one YAML each in ``conf/scheduler/`` (a partial ``_target_``).

A schedule is a factory ``(optimizer, total_steps) -> dict``: the Lightning lr-scheduler config
(``interval: "step"``) that scales every parameter group's learning rate once per optimizer step.
``total_steps`` is ``trainer.estimated_stepping_batches``, so the same schedule fits a run given in
steps (``max_steps``) or in epochs. ``configure_scheduler`` is what
``TransferModule.configure_optimizers`` calls.

All schedules are multipliers of each group's own learning rate (discriminative rates keep their
ratios) on one scheduler class that also schedules groups added mid-training: Lightning's
``BaseFinetuning`` (``gradual_unfreeze``) adds groups, and torch's schedulers raise on a group count
that changed since they were built (``zip(..., strict=True)``; ``OneCycleLR`` reads per-group keys
the new group lacks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from transfer_lab.errors import ConfigError

ScheduleFactory = Callable[[torch.optim.Optimizer, int], dict]


class StepSchedule(LRScheduler):
    """``lr = base_lr × multiplier(step)`` for every parameter group, including groups added after
    the scheduler was built (their learning rate when added is their base)."""

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]) -> None:
        self.multiplier = multiplier
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        for group in self.optimizer.param_groups[len(self.base_lrs):]:
            self.base_lrs.append(group.setdefault("initial_lr", group["lr"]))
        m = self.multiplier(self.last_epoch)
        return [base * m for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        # the multiplier is rebuilt from config by configure_optimizers; leaving it out keeps a
        # checkpoint loadable with weights_only=True (plain numbers and lists only)
        return {k: v for k, v in super().state_dict().items() if k != "multiplier"}


def _per_step(optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]) -> dict:
    return {"scheduler": StepSchedule(optimizer, multiplier), "interval": "step", "frequency": 1}


def constant(optimizer: torch.optim.Optimizer, total_steps: int) -> dict:
    """The optimizer's learning rate throughout."""
    return _per_step(optimizer, _one)


def _one(step: int) -> float:
    return 1.0


def cosine(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05,
           min_lr_ratio: float = 0.0) -> dict:
    """Linear warm-up over the first ``warmup_fraction`` of the steps (step ``i`` at ``(i+1)/w`` of
    the rate, full rate at the last warm-up step), then cosine decay to ``min_lr_ratio`` × rate."""
    if not 0 <= warmup_fraction < 1:
        raise ConfigError(f"scheduler.warmup_fraction={warmup_fraction}: must be in [0, 1)")
    if not 0 <= min_lr_ratio <= 1:
        raise ConfigError(f"scheduler.min_lr_ratio={min_lr_ratio}: must be in [0, 1]")
    warmup = round(warmup_fraction * total_steps)
    return _per_step(optimizer, partial(cosine_multiplier, total=total_steps, warmup=warmup,
                                        min_ratio=min_lr_ratio))


def cosine_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def onecycle(optimizer: torch.optim.Optimizer, total_steps: int, pct_start: float = 0.3,
             div_factor: float = 25.0, final_div_factor: float = 1e4) -> dict:
    """Smith's one-cycle policy as ``torch.optim.lr_scheduler.OneCycleLR`` (cosine annealing, no
    momentum cycling) with each group's rate as its peak: from rate/``div_factor`` up to the rate
    at ``pct_start`` of the steps, then down to rate/(``div_factor``·``final_div_factor``)."""
    if not 0 < pct_start < 1:
        raise ConfigError(f"scheduler.pct_start={pct_start}: must be in (0, 1)")
    if div_factor < 1 or final_div_factor < 1:
        raise ConfigError(f"scheduler.div_factor={div_factor}, final_div_factor={final_div_factor}: must be ≥ 1")
    return _per_step(optimizer, partial(onecycle_multiplier, total=total_steps, pct_start=pct_start,
                                        div_factor=div_factor, final_div_factor=final_div_factor))


def onecycle_multiplier(step: int, total: int, pct_start: float, div_factor: float,
                        final_div_factor: float) -> float:
    start, low = 1 / div_factor, 1 / (div_factor * final_div_factor)
    peak_step = float(pct_start * total) - 1  # OneCycleLR's phase boundary
    if step <= peak_step:
        pct = step / peak_step if peak_step > 0 else 1.0
        return anneal_cos(start, 1.0, pct)
    pct = min(1.0, (step - peak_step) / max(1e-12, total - 1 - peak_step))
    return anneal_cos(1.0, low, pct)


def anneal_cos(begin: float, end: float, pct: float) -> float:
    """Cosine annealing from ``begin`` to ``end`` as ``pct`` goes 0 → 1 (OneCycleLR's ``cos``)."""
    return end + (begin - end) / 2 * (math.cos(math.pi * pct) + 1)


def configure_scheduler(factory: ScheduleFactory | None, optimizer: torch.optim.Optimizer,
                        trainer: Any) -> dict:
    """What ``configure_optimizers`` returns: the optimizer, plus the schedule over the run's total
    optimizer steps (``trainer.estimated_stepping_batches``: max_steps, or epochs × batches, over
    gradient accumulation and devices) when ``factory`` is given."""
    if factory is None:
        return {"optimizer": optimizer}
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total) or total < 1:
        raise ConfigError(f"scheduler: the run's length is {total} optimizer steps; a schedule needs "
                          "a finite length (set target.steps or target.epochs)")
    config = factory(optimizer, int(total))
    if not isinstance(config, dict) or config.get("interval") != "step":
        raise ConfigError(f"scheduler: {factory} must return a Lightning lr_scheduler dict with "
                          "interval='step'")
    return {"optimizer": optimizer, "lr_scheduler": config}
