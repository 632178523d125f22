"""A diagnostic Lightning callback: at every validation, the mean of each loss term since the last
validation, the learning rate and DANN's reversal weight λ; written as JSON at the end of fit,
with the convergence rule re-applied to the recorded curve (``transfer_lab.convergence.judge``).

Used by the README's "Why DANN's task loss keeps falling" section, added to a run without
touching the framework (the ``trainer.callbacks`` list; the source store key does not read it):

    python -m transfer_lab.train experiment=domain_adaptation strategy=dann ... \
        '+trainer.callbacks=[{_target_: experiments.domain_adaptation.loss_trace.LossTrace, path: trace.json}]'

(``PYTHONPATH`` = the repository root, so ``experiments`` imports.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transfer_lab.convergence import ConvergenceCheck, judge


class LossTrace(Callback):
    """Records ``{step, lr, lambda, val, terms}`` at each validation of the target stage."""

    def __init__(self, path: str = "loss_trace.json") -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self._sums: dict[str, torch.Tensor] = {}
        self._n = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        terms = dict(getattr(pl_module, "last_terms", None) or {})
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            terms["loss"] = loss
        for name, value in terms.items():
            if isinstance(value, torch.Tensor):
                v = value.detach().float()
                self._sums[name] = v if name not in self._sums else self._sums[name] + v
        self._n += 1

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or "val/acc" not in trainer.callback_metrics:
            return
        grl = next((c.grl for c in trainer.callbacks if hasattr(c, "grl")), None)
        self.rows.append({
            "step": int(trainer.global_step),
            "lr": trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None,
            "lambda": None if grl is None else float(grl.lambd),
            "val_acc": float(trainer.callback_metrics["val/acc"]),
            "terms": {k: float(v) / self._n for k, v in self._sums.items()} if self._n else {}})
        self._sums, self._n = {}, 0

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        check = next((c for c in trainer.callbacks if isinstance(c, ConvergenceCheck)), None)
        if check is None or not self.rows:
            return  # the source stage (no convergence check): nothing to record
        out: dict[str, Any] = {"rows": self.rows, "steps": int(trainer.global_step)}
        for term in sorted(self.rows[-1]["terms"]):  # the rule applied to each term's curve
            hist = [(r["step"], r["val_acc"], r["terms"].get(term)) for r in self.rows]
            out[f"judge_{term}"] = judge(hist, int(trainer.global_step), check.monitor, check.mode,
                                         check.val_tol, check.loss_tol, check.min_evals, f"train/{term}")
        Path(self.path).write_text(json.dumps(out, indent=1))
