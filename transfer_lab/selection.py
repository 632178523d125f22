"""Model selection on validation, never on test: ``target.select=last|best_val``.

``best_val`` keeps the checkpoint with the best validation metric (Lightning's ``ModelCheckpoint``)
and the run tests that checkpoint; ``last`` tests the weights training ended with. Either way
``results.json`` records what was chosen: ``selection: {select, monitor, mode, step, value}``.
Early stopping (``target.early_stopping: {patience, min_delta}``) is Lightning's ``EarlyStopping``,
counted in validations (every ``val_check_interval`` steps).

Which validation split: the target's, unless a strategy that trains on source data says
``validate_on=source`` (``dann``, ``source_only``: unsupervised domain adaptation, where no target
label may choose anything) — then selection, tuning (``optimized_metric``) and the convergence
check read the source domain's validation split; ``selection.data`` in ``results.json`` then names it
(``source.data``; absent when the target's validation split selected).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint

from transfer_lab.errors import ConfigError

SELECT = ("last", "best_val")
MODES = ("min", "max")
EARLY_STOPPING_KEYS = ("patience", "min_delta")
VALIDATE_ON = ("target", "source")


def check_validate_on(value: str, strategy: str) -> str:
    """``strategy.validate_on``: ``target`` (the target's labelled validation split) or ``source``."""
    if value not in VALIDATE_ON:
        raise ConfigError(f"strategy.validate_on={value!r} (strategy={strategy}): valid: {', '.join(VALIDATE_ON)}")
    return value


def validation_data(validate_on: str, target_dm: Any, source_dm: Any) -> Any:
    """The data module whose validation split selects the model."""
    return source_dm if validate_on == "source" else target_dm


def default_monitor(task: str) -> tuple[str, str]:
    """``(metric, mode)`` judged on validation: accuracy for classification, the loss for regression
    (on the standardised target, so its scale is the same for every data set)."""
    return ("val/loss", "min") if task == "regression" else ("val/acc", "max")


def mode_of(metric: str) -> str:
    """``min`` for losses and errors, ``max`` for everything else (accuracy, r2)."""
    return "min" if metric.endswith(("loss", "mse", "rmse", "error")) else "max"


class Selection:
    """The callbacks that select a target model on validation, and what they chose after ``fit``.

    Args:
        select: ``last`` or ``best_val``.
        task: ``classification`` or ``regression`` (picks the default monitor).
        ckpt_dir: where ``best_val`` keeps its checkpoint (``best.ckpt``).
        early_stopping: ``{patience, min_delta}`` or None.
        monitor / mode: override the task's default metric and direction.
    """

    def __init__(self, select: str, task: str, ckpt_dir: str | Path,
                 early_stopping: Mapping[str, Any] | None = None,
                 monitor: str | None = None, mode: str | None = None) -> None:
        if select not in SELECT:
            raise ConfigError(f"target.select={select!r}: valid: {', '.join(SELECT)}")
        self.select, self.monitor = select, monitor or default_monitor(task)[0]
        self.mode = mode or mode_of(self.monitor)
        if self.mode not in MODES:
            raise ConfigError(f"selection mode={self.mode!r} (for {self.monitor}): valid: {', '.join(MODES)}")
        if not self.monitor.startswith("val/"):
            raise ConfigError(f"target.monitor={self.monitor!r}: selection uses a validation metric "
                              "(val/...), never a test one")
        # judged at every validation: Lightning's default would save at the epoch's end whenever
        # val_check_interval == 1 (it reads the int 1 as "once per epoch")
        self.checkpoint = (ModelCheckpoint(dirpath=str(ckpt_dir), filename="best", monitor=self.monitor,
                                           mode=self.mode, save_top_k=1, save_last=False,
                                           save_on_train_epoch_end=False, save_weights_only=True,
                                           enable_version_counter=False)
                           if select == "best_val" else None)
        self.early_stopping = self._early_stopping(early_stopping)

    def _early_stopping(self, spec: Mapping[str, Any] | None) -> EarlyStopping | None:
        if spec is None:
            return None
        unknown = sorted(set(spec) - set(EARLY_STOPPING_KEYS))
        if unknown:
            raise ConfigError(f"target.early_stopping.{unknown[0]}: unknown key; valid: "
                              f"{', '.join(EARLY_STOPPING_KEYS)} (or target.early_stopping=null)")
        patience, min_delta = int(spec.get("patience", 10)), float(spec.get("min_delta", 0.0))
        if patience < 1 or min_delta < 0:
            raise ConfigError(f"target.early_stopping={dict(spec)}: need patience ≥ 1, min_delta ≥ 0")
        # judged at each validation (every val_check_interval steps), not at the epoch's end
        return EarlyStopping(monitor=self.monitor, mode=self.mode, patience=patience, min_delta=min_delta,
                             check_on_train_epoch_end=False, strict=True)

    def callbacks(self) -> list[Callback]:
        return [c for c in (self.checkpoint, self.early_stopping) if c is not None]

    def chosen(self, trainer: Any) -> tuple[str | None, dict]:
        """After ``fit``: the checkpoint to test (None: the current weights) and the record for
        ``results.json``. ``best_val`` without any validation falls back to the last weights."""
        record = {"select": self.select, "monitor": self.monitor, "mode": self.mode}
        dm = getattr(trainer, "datamodule", None)  # validated on another split than the target's
        other = getattr(dm, "validate", None)
        if other is not None and other is not getattr(dm, "evaluate", None):
            record["data"] = getattr(other, "key", None)
        best = self.checkpoint.best_model_path if self.checkpoint is not None else ""
        if best:
            # the checkpoint's own step: mmap reads the header, not the weights
            state = torch.load(best, map_location="cpu", weights_only=True, mmap=True)
            score = self.checkpoint.best_model_score
            return best, {**record, "step": int(state["global_step"]),
                          "value": float(score) if score is not None else None}
        last = trainer.callback_metrics.get(self.monitor)
        return None, {**record, "step": int(trainer.global_step),
                      "value": float(last) if last is not None else None,
                      **({"fallback": "no validation ran: last weights"} if self.select == "best_val" else {})}
