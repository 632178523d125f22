"""Per-seed model selection and convergence curves of a vectorised group (``target.select``).

``SeedSelection`` is what ``transfer_lab.selection.Selection`` does for one model, done for each
of the K seeds: with ``best_val`` every seed keeps its own best-validation tensors (the rule of
Lightning's ``ModelCheckpoint(save_top_k=1)`` on the monitor: the first validation is kept, then
only a strictly better value replaces it; NaN counts as the worst), in memory and in the group's
checkpoint, and before testing each seed's slice is put back. ``record(k)`` is the
``results.json`` ``selection`` entry its separate run writes.

``SeedCurves`` writes each validation's monitor value and training loss into the module's
per-seed ``history`` as ``ConvergenceCheck`` records them: the loss is the mean training loss since
the previous validation.

Early stopping is not here: one model cannot stop for one seed and train on for another, so a
cell asking for it trains alone (``group.cheap_check``).
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from transfer_lab.selection import SELECT, mode_of

#: the validation metrics the vectorised module records per seed (what a monitor may be)
MONITORS = ("val/acc", "val/loss")


class SeedSelection(Callback):
    """Each seed's ``target.select`` (``last`` | ``best_val``) on ``monitor``, judged at every
    validation of the fit; ``restore`` puts the chosen tensors back before testing."""

    def __init__(self, k: int, select: str = "last", monitor: str = "val/acc", mode: str | None = None) -> None:
        if select not in SELECT or monitor not in MONITORS:
            raise ValueError(f"select={select!r}, monitor={monitor!r}: valid: {SELECT} on {MONITORS}")
        self.k, self.select, self.monitor = k, select, monitor
        self.mode = mode or mode_of(monitor)
        self.score: list[float | None] = [None] * k
        self.step: list[int | None] = [None] * k
        self.best: list[dict[str, torch.Tensor] | None] = [None] * k
        self._last_step: int | None = None
        self.last: list[float | None] = [None] * k  # the last validation's value (select=last)

    def _better(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best  # NaN: never

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint's skips: sanity checks, outside fit, a step already judged
        if trainer.sanity_checking or trainer.state.fn != "fit" or self._last_step == trainer.global_step:
            return
        self._last_step = int(trainer.global_step)
        values = [pl_module.seed_metrics[k].get(self.monitor) for k in range(self.k)]
        self.last = [None if v is None else float(v) for v in values]
        if self.select != "best_val":
            return
        for k, v in enumerate(self.last):
            if v is None or not self._better(v, self.score[k]):
                continue
            worst = math.inf if self.mode == "min" else -math.inf
            self.score[k] = worst if math.isnan(v) else v
            self.step[k] = self._last_step
            # the seed's whole state (trainable, frozen and BatchNorm statistics), as a checkpoint
            self.best[k] = {n: t.detach().clone() for n, t in pl_module.stacked.seed(k).items()}

    @torch.no_grad()
    def restore(self, pl_module: L.LightningModule) -> None:
        """Put each seed's best tensors back into the stacked model (seeds without one keep theirs)."""
        stacked = pl_module.stacked.tensors()
        for k, best in enumerate(self.best):
            if best is not None:
                for n, t in best.items():
                    stacked[n][k].copy_(t.to(stacked[n].device))

    def record(self, k: int, global_step: int) -> dict[str, Any]:
        """Seed ``k``'s ``selection`` entry, keys and values as ``Selection.chosen`` writes them."""
        record = {"select": self.select, "monitor": self.monitor, "mode": self.mode}
        if self.select == "best_val" and self.best[k] is not None:
            return {**record, "step": self.step[k], "value": self.score[k]}
        return {**record, "step": int(global_step), "value": self.last[k],
                **({"fallback": "no validation ran: last weights"} if self.select == "best_val" else {})}

    def chosen_value(self, k: int) -> float | None:
        """The tested model's monitor value when a best checkpoint was chosen (else None)."""
        return self.score[k] if self.select == "best_val" and self.best[k] is not None else None

    def state_dict(self) -> dict[str, Any]:  # in the group's last.ckpt: a resumed group keeps its bests
        return {"score": list(self.score), "step": list(self.step), "last": list(self.last),
                "best": [None if b is None else {n: t.cpu() for n, t in b.items()} for b in self.best]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.score, self.step = list(state_dict["score"]), list(state_dict["step"])
        self.last, self.best = list(state_dict.get("last", [None] * self.k)), list(state_dict["best"])


class SeedCurves(Callback):
    """At each validation, every seed's ``monitor`` value and mean training loss since the previous
    validation (as ``ConvergenceCheck`` records them: the plain mean of the step losses) go into
    ``pl_module.history``.

    Reads the module's per-epoch device sums (``train_loss_sum()``: Σ step loss × batch size), cut
    into runs of steps of one batch size (a short last batch starts a new run), so the mean is
    unweighted by batch size, with no per-step tensor work and one host sync per validation."""

    def __init__(self, monitor: str = "val/acc") -> None:
        self.monitor = monitor
        self._acc: torch.Tensor | float = 0.0  # Σ step losses of the closed runs since the validation
        self._base: torch.Tensor | float = 0.0  # the epoch's loss sum where the open run began
        self._n: int | None = None  # the open run's batch size
        self._steps = 0
        self._pending: list[float | None] | None = None

    @staticmethod
    def _sum(pl_module: L.LightningModule) -> torch.Tensor | float:
        value = pl_module.train_loss_sum()
        return 0.0 if value is None else value.detach().clone()

    def _close(self, now: torch.Tensor | float) -> None:
        if self._n:
            self._acc = self._acc + (now - self._base) / self._n
        self._base = now

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        n = int(batch[1].shape[1])  # K×B targets
        if n != self._n:
            self._close(self._sum(pl_module))
            self._n = n
        self._steps += 1

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # callbacks run before the module's hook: its sums still hold the whole epoch; the next
        # epoch's sums start from zero
        self._close(self._sum(pl_module))
        self._base = 0.0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._pending = None
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._close(self._sum(pl_module))
        total = torch.as_tensor(self._acc).double().cpu().expand(pl_module.k)
        self._pending = [float(total[k]) / self._steps if self._steps else None for k in range(pl_module.k)]
        self._acc, self._steps = 0.0, 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._pending is None:
            return
        for k, hist in enumerate(pl_module.history):
            if hist and hist[-1][0] == trainer.global_step:
                value = pl_module.seed_metrics[k].get(self.monitor, hist[-1][1])
                hist[-1] = (hist[-1][0], value, self._pending[k])
        self._pending = None
