"""Did a cell train long enough? A Lightning callback that judges it from the run's own curves.

Rule (stated in ``RULE`` and in ``results.json``): over the last fifth of training, the best
validation metric improved by less than ``val_tol`` (absolute, in the metric's units: 0.01 = one
point of accuracy; for regression the loss is on the standardised target) AND the mean training
loss fell by less than ``loss_rtol`` (relative: 0.05 = 5%) or by less than ``loss_atol`` (absolute:
a memorised training set's loss keeps halving, 0.004 → 0.002, with nothing left to learn). The last fifth starts at the last
validation at or before 80% of the run's steps. Fewer than ``min_evals`` validations, or no
validation before the last fifth, means ``converged: false`` — there is no curve to judge.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

RULE = ("converged when, over the last fifth of training steps, the best {monitor} improved by less "
        "than {val_tol} (absolute) and the mean training loss fell by less than {loss_pct:g}% "
        "(relative) or by less than {loss_atol} (absolute); fewer than {min_evals} validations, or none before the last fifth, is not converged")


class ConvergenceCheck(Callback):
    """Records ``(global step, validation metric, mean training loss since the last validation)``
    at every validation and, at the end of fit, ``self.result`` — the ``convergence`` entry of
    ``results.json``.

    Args:
        monitor: validation metric (``val/acc``; ``val/loss`` for regression).
        mode: ``max`` or ``min`` for ``monitor``.
        val_tol: largest improvement of the best metric over the last fifth that still counts as flat.
        loss_rtol: largest relative fall of the training loss over the last fifth that counts as flat.
        loss_atol: a fall smaller than this (absolute) counts as flat whatever its relative size.
        min_evals: fewest validations to judge a curve from.
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max", val_tol: float = 0.01,
                 loss_rtol: float = 0.05, loss_atol: float = 0.01, min_evals: int = 3) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r}: valid: min, max")
        self.monitor, self.mode = monitor, mode
        self.val_tol, self.loss_rtol, self.loss_atol = float(val_tol), float(loss_rtol), float(loss_atol)
        self.min_evals = int(min_evals)
        self.history: list[tuple[int, float, float | None]] = []
        self.result: dict[str, Any] | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            # summed on the device: no host sync per step, one per validation
            d = loss.detach().float()
            self._loss_sum = d if self._loss_sum is None else self._loss_sum + d
            self._loss_count += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        self.history.append((int(trainer.global_step), value, loss))
        self._loss_sum, self._loss_count = None, 0

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.result = judge(self.history, int(trainer.global_step), self.monitor, self.mode,
                            self.val_tol, self.loss_rtol, self.loss_atol, self.min_evals)

    def state_dict(self) -> dict[str, Any]:  # a resumed run judges its whole curve
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]


def judge(history: list[tuple[int, float, float | None]], steps: int, monitor: str, mode: str,
          val_tol: float, loss_rtol: float, loss_atol: float, min_evals: int) -> dict[str, Any]:
    """The ``convergence`` record of a run from its ``(step, metric, train loss)`` history."""
    out: dict[str, Any] = {
        "converged": False, "val_metric_change_last_fifth": None, "train_loss_change_last_fifth": None,
        "n_evals": len(history), "steps": steps, "monitor": monitor,
        "rule": RULE.format(monitor=monitor, val_tol=val_tol, loss_pct=100 * loss_rtol,
                            loss_atol=loss_atol, min_evals=min_evals)}
    before = [h for h in history if h[0] <= 0.8 * steps]
    if len(history) < min_evals or not before or before[-1] is history[-1]:
        out["reason"] = f"{len(history)} validation(s), {len(before)} before the last fifth: too few to judge"
        return out
    best = max if mode == "max" else min
    sign = 1.0 if mode == "max" else -1.0
    # change of the best-so-far: a noisy or overfitting late curve is flat, only a new best counts
    val_change = sign * (best(h[1] for h in history) - best(h[1] for h in before))
    ref_loss, end_loss = before[-1][2], history[-1][2]
    reasons = []
    if val_change >= val_tol:
        reasons.append(f"{monitor} still improving (+{val_change:.4f} ≥ {val_tol})")
    if ref_loss is None or end_loss is None:
        reasons.append("no training loss recorded")
    else:
        fall = ref_loss - end_loss
        rel = fall / abs(ref_loss) if ref_loss else 0.0
        out["train_loss_change_last_fifth"] = round(-rel, 6)  # relative: −0.12 = fell 12%
        if rel >= loss_rtol and fall >= loss_atol:
            reasons.append(f"training loss still falling ({ref_loss:.4g} → {end_loss:.4g}, "
                           f"{100 * rel:.1f}% ≥ {100 * loss_rtol:g}%)")
    out["val_metric_change_last_fifth"] = round(val_change, 6)
    out["converged"] = not reasons
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out
