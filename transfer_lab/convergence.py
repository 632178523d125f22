"""Did a cell train long enough? A Lightning callback that judges it from the run's own curves.

Rule (``RULE``, also written into ``results.json``). The last fifth of training starts at the last
validation at or before 80% of the run's steps. A cell has converged when
- the curve is long enough to judge: at least ``min_evals`` validations, two or more of them
  after the start of the last fifth;
- the best validation metric improved by less than ``val_tol`` over the last fifth (absolute, in
  the metric's units: 0.01 = one point of accuracy; for regression the loss on the standardised
  target); and
- the training loss fell over the run by more than ``loss_tol`` (5%) of its first value, and over
  the last fifth by less than ``loss_tol`` of that whole fall (since the first validation) — a loss
  falling in a straight line (a too-low learning rate) or hardly at all does not pass; a memorised
  training set's loss halving at 0.004 → 0.002 does.
(An exponential decay passes the 5% after about three time constants.)

Which training loss: the strategy's summed loss (``train/loss``), unless the strategy declares
``convergence_term`` — the one term meant to fall when another is not (``dann``'s domain term is
adversarial and rises by design): then that term (``train/task``). ``loss_series`` in the record
names the series judged.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

RULE = ("converged when, over the last fifth of training steps, the best {monitor} improved by less "
        "than {val_tol} (absolute) and the training loss ({series}), which fell by more than {loss_pct:g}% "
        "over the run, fell by less than {loss_pct:g}% of that fall; at least {min_evals} validations, two of them in the "
        "last fifth")


class ConvergenceCheck(Callback):
    """Records ``(global step, validation metric, mean training loss since the last validation)``
    at every validation and, at the end of fit, ``self.result`` — the ``convergence`` entry of
    ``results.json``. The training loss is the step's summed loss, or the term the module's
    strategy names in ``convergence_term`` (``TransferModule.last_terms``).

    Args:
        monitor: validation metric (``val/acc``; ``val/loss`` for regression).
        mode: ``max`` or ``min`` for ``monitor``.
        val_tol: largest improvement of the best metric over the last fifth that still counts as flat.
        loss_tol: largest share of the training loss's whole fall that may happen in the last fifth.
        min_evals: fewest validations to judge a curve from.
    """

    def __init__(self, monitor: str = "val/acc", mode: str = "max", val_tol: float = 0.01,
                 loss_tol: float = 0.05, min_evals: int = 3) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode={mode!r}: valid: min, max")
        self.monitor, self.mode = monitor, mode
        self.val_tol, self.loss_tol, self.min_evals = float(val_tol), float(loss_tol), int(min_evals)
        self.history: list[tuple[int, float, float | None]] = []
        self.result: dict[str, Any] | None = None
        self._loss_sum: torch.Tensor | None = None
        self._loss_count = 0
        self.term: str | None = None  # the strategy's convergence_term (None: the summed loss)
        self._strategy = ""

    @property
    def loss_series(self) -> str:
        return f"train/{self.term or 'loss'}"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        strategy = getattr(pl_module, "strategy", None)
        self.term = getattr(strategy, "convergence_term", None)
        self._strategy = getattr(strategy, "name", type(strategy).__name__)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if self.term is not None:  # TransferModule.last_terms: the step's terms by name
            terms = getattr(pl_module, "last_terms", None)
            if not terms or self.term not in terms:
                raise ValueError(f"strategy={self._strategy}: convergence_term={self.term!r} is not one of "
                                 f"its loss terms ({', '.join(terms or {}) or 'none returned'})")
            loss = terms[self.term]
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
                            self.val_tol, self.loss_tol, self.min_evals, self.loss_series)

    def state_dict(self) -> dict[str, Any]:  # a resumed run judges its whole curve
        return {"history": [list(h) for h in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [tuple(h) for h in state_dict.get("history", [])]


def judge(history: list[tuple[int, float, float | None]], steps: int, monitor: str, mode: str,
          val_tol: float, loss_tol: float, min_evals: int, loss_series: str = "train/loss") -> dict[str, Any]:
    """The ``convergence`` record of a run from its ``(step, metric, train loss)`` history;
    ``loss_series`` names the training loss judged (``train/loss``, or a term: ``train/task``)."""
    out: dict[str, Any] = {
        "converged": False, "val_metric_change_last_fifth": None, "train_loss_change_last_fifth": None,
        "train_loss_share_last_fifth": None, "n_evals": len(history), "steps": steps, "monitor": monitor,
        "loss_series": loss_series,
        "rule": RULE.format(monitor=monitor, val_tol=val_tol, loss_pct=100 * loss_tol, min_evals=min_evals,
                            series=loss_series)}
    before = [h for h in history if h[0] <= 0.8 * steps]
    n_last = len(history) - len(before)
    if len(history) < min_evals or not before or n_last < 2:
        out["reason"] = (f"{len(history)} validation(s), {n_last} in the last fifth: too few to judge "
                         "(train longer or validate more often: target.val_check_interval)")
        return out
    best = max if mode == "max" else min
    sign = 1.0 if mode == "max" else -1.0
    # change of the best-so-far: a noisy or overfitting late curve is flat, only a new best counts
    val_change = sign * (best(h[1] for h in history) - best(h[1] for h in before))
    # decided on the rounded change it records: metrics logged in float32 make a gain of exactly one
    # validation image 0.00999999 or 0.01000005 depending on the values (0.64 - 0.63 vs 0.60 - 0.59)
    val_change = round(val_change, 6)
    out["val_metric_change_last_fifth"] = val_change
    reasons = [f"{monitor} still improving (+{val_change:.4f} ≥ {val_tol})"] if val_change >= val_tol else []
    first, ref, end = history[0][2], before[-1][2], history[-1][2]
    if first is None or ref is None or end is None:
        reasons.append("no training loss recorded")
    else:
        out["train_loss_change_last_fifth"] = round((end - ref) / abs(ref), 6) if ref else None  # −0.1: fell 10%
        whole = first - end
        share = (ref - end) / whole if whole > 0 else None
        out["train_loss_share_last_fifth"] = None if share is None else round(share, 6)
        if whole <= loss_tol * abs(first):  # within noise of where it started: the share means nothing
            reasons.append(f"training loss ({loss_series}) barely fell over the run ({first:.4g} → {end:.4g})")
        elif share >= loss_tol:
            reasons.append(f"training loss ({loss_series}) still falling ({100 * share:.0f}% of its fall came "
                           f"in the last fifth ≥ {100 * loss_tol:g}%)")
    out["converged"] = not reasons
    if reasons:
        out["reason"] = "; ".join(reasons)
    return out
