"""TransferModule: a model plus a strategy, trained and evaluated by Lightning."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from transfer_lab.schedulers import configure_scheduler
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import hold_frozen_in_eval


TASKS = ("classification", "regression")


class NonFiniteLossError(RuntimeError):
    pass


class TransferModule(L.LightningModule):
    """Trains ``model`` on the target task the way ``strategy`` says.

    Args:
        model: the model to train (usually ``strategy.build(source, target)``).
        strategy: supplies the loss terms, the parameter groups, its own trainable modules
            (registered here as ``strategy_modules``) and callbacks.
        optimizer: a partial optimizer (``torch.optim.Adam``, ...) taking param groups.
        lr: base learning rate; the strategy derives group rates from it.
        num_classes: for the accuracy metrics.
        class_weights: optional per-class loss weights (imbalance remedy).
        scheduler: a schedule factory ``(optimizer, total_steps) -> lr_scheduler dict``
            (``transfer_lab.schedulers``), or None for the optimizer's rate throughout.
        task: ``classification`` (cross-entropy; accuracy, balanced and per-class accuracy) or
            ``regression`` (MSE on one output; ``mse``, ``rmse``, ``r2``), as the data module says.
        target_norm: regression only: ``(mean, std)`` — the model predicts ``(y − mean) / std``;
            the loss is taken there, metrics in the target's own units.
    """

    def __init__(self, model: nn.Module, strategy: Strategy, optimizer: Callable[..., torch.optim.Optimizer],
                 lr: float, num_classes: int, class_weights: torch.Tensor | None = None,
                 scheduler: Callable[..., dict] | None = None, task: str = "classification",
                 target_norm: tuple[float, float] | None = None) -> None:
        super().__init__()
        if task not in TASKS:
            raise ValueError(f"task={task!r}: valid: {', '.join(TASKS)}")
        self.save_hyperparameters(ignore=["model", "strategy", "optimizer", "class_weights", "scheduler"])
        self.model, self.strategy, self.optimizer_factory = model, strategy, optimizer
        self.scheduler_factory = scheduler
        self.task = task
        self.target_norm = tuple(float(v) for v in target_norm) if target_norm else (0.0, 1.0)
        self.register_buffer("class_weights", class_weights, persistent=False)
        if task == "regression":
            self.train_mse = torchmetrics.MeanSquaredError()
            self.val_mse, self.test_mse = torchmetrics.MeanSquaredError(), torchmetrics.MeanSquaredError()
            self.val_r2, self.test_r2 = torchmetrics.R2Score(), torchmetrics.R2Score()
        else:
            # validate_args=False: the checks run torch.unique on the targets and compare in
            # Python, a host sync on every update (every training step)
            kw = {"num_classes": num_classes, "validate_args": False}
            # training accuracy: correct predictions summed on the device in ``training_step``
            # (a torchmetrics update every step cost more than the rest of our step's bookkeeping)
            self.val_acc = torchmetrics.Accuracy(task="multiclass", **kw)
            self.test_acc = torchmetrics.Accuracy(task="multiclass", **kw)
            # per-class recall and its mean (balanced accuracy) from one DDP-synced confusion matrix
            self.test_confusion = torchmetrics.classification.MulticlassConfusionMatrix(**kw)
        self.test_per_class: list[float] | None = None
        # registered once: on the training device, in the optimizer, in checkpoints
        self.strategy_modules = strategy.modules()
        # epoch sums kept on the device: (loss, term…) × batch size, and correct predictions
        self._epoch_sums = EpochSums()

    def task_loss(self, outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The supervised loss of the task: (class-weighted) cross-entropy, or MSE for regression
        (on the standardised target)."""
        if self.task == "regression":
            mean, std = self.target_norm
            return F.mse_loss(outputs.squeeze(-1), (y - mean) / std)
        return F.cross_entropy(outputs, y, weight=self.class_weights)

    def predict_value(self, outputs: torch.Tensor) -> torch.Tensor:
        """Regression: the model's output in the target's units."""
        mean, std = self.target_norm
        return outputs.squeeze(-1) * std + mean

    def update_train_metric(self, outputs: torch.Tensor, y: torch.Tensor) -> None:
        if self.task == "regression":
            self.train_mse.update(self.predict_value(outputs.detach()), y)
            return
        # micro accuracy, as torchmetrics' multiclass Accuracy: argmax over the class dimension
        self._epoch_sums.add_correct((outputs.detach().argmax(1) == y).sum(), y.numel())

    @property
    def last_terms(self) -> dict[str, torch.Tensor]:
        """The latest training step's loss terms, by name (what callbacks may judge)."""
        return self._epoch_sums.last

    @property
    def backbone(self) -> nn.Module:  # what BaseFinetuning-style callbacks look for
        return self.model.backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def train(self, mode: bool = True) -> TransferModule:
        """Keep fully frozen parts in eval mode: BatchNorm statistics do not drift (unless the
        strategy's ``train_bn``) and Dropout does not mask features of a fixed extractor.
        ``on_train_epoch_start`` calls it: Lightning itself does not during fit."""
        super().train(mode)
        if mode:
            hold_frozen_in_eval(self.model, self.strategy.train_bn)
        return self

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        step = self.strategy.loss(self.model, batch, self.task_loss)
        if not step.terms:
            raise ValueError(f"strategy={self.strategy.name}: loss() returned no loss terms; "
                             "return at least {'task': task_loss(outputs, y)}")
        loss = sum(step.terms.values())
        self.update_train_metric(step.outputs, step.target)
        # Epoch means are summed on the device and logged once per epoch: no host sync per
        # step, and none of ``self.log``'s per-call bookkeeping (~1% of a small CNN's step).
        n = len(step.target)
        with torch.no_grad():  # one stacked add a step (a float32 sum per term, as before)
            row = torch.stack([loss, *step.terms.values()]).float() * n
        self._epoch_sums.add_terms(row, ["loss", *step.terms], n)
        self._epoch_sums.last = step.terms  # for callbacks: ConvergenceCheck's convergence_term
        return loss

    def on_train_epoch_start(self) -> None:
        # Lightning 2.6 never calls ``train()`` in fit: it keeps the modes the modules have
        # (``freeze`` left frozen parts in eval, BatchNorm included, whatever ``train_bn`` says).
        # This hook runs after the callbacks' (a block a schedule just unfroze trains in training
        # mode); validation loops capture and restore these modes, so they hold all epoch.
        self.train()
        self._epoch_sums = EpochSums()
        # Lightning sets the epoch only on a loader's ``.sampler``; our in-memory loaders shuffle
        # by their own epoch counter, which a resumed run would restart at 0 (replaying epoch 0's
        # order). Setting it from the trainer makes a resumed run see the uninterrupted order.
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        if self.task == "regression":
            self.log("train/mse", self.train_mse.compute())
            self.train_mse.reset()
        elif (e := self._epoch_sums).correct is not None:  # summed over processes (DDP), as synced
            counts = torch.stack([e.correct.double(), e.correct.new_tensor(e.seen).double()])
            correct, seen = self.trainer.strategy.reduce(counts, reduce_op="sum").float()
            self.log("train/acc", correct / seen)
        e = self._epoch_sums
        if not e.count:
            return
        means = {k: v / e.count for k, v in zip(e.names, e.sums.unbind(0))}
        for name, value in means.items():  # train/loss and train/<term> for each term
            self.log(f"train/{name}", value)
        loss = means["loss"]
        if not math.isfinite(float(loss)):  # the epoch's one host sync
            raise NonFiniteLossError(f"non-finite training loss ({float(loss)}) in epoch "
                                     f"{self.current_epoch} (global step {self.global_step}) "
                                     f"with strategy={self.strategy.name}")

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch
        out = self(x)
        if self.task == "regression":
            pred = self.predict_value(out)
            mse, r2 = getattr(self, f"{stage}_mse"), getattr(self, f"{stage}_r2")
            mse.update(pred, y)
            r2.update(pred, y)
            # the loss on the standardised target, as in training; mse/rmse/r2 in the target's units
            self.log(f"{stage}/loss", self.task_loss(out, y), on_epoch=True, batch_size=len(y))
            self.log(f"{stage}/mse", mse, on_epoch=True)
            self.log(f"{stage}/r2", r2, on_epoch=True)
            return
        metric = getattr(self, f"{stage}_acc")
        metric.update(out, y)
        if stage == "test":
            self.test_confusion.update(out, y)
        self.log(f"{stage}/loss", F.cross_entropy(out, y), on_epoch=True, batch_size=len(y))
        self.log(f"{stage}/acc", metric, on_epoch=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_derived(self, stage: str) -> None:
        if self.task == "regression":  # RMSE from the epoch's MSE (the metric is already synced)
            self.log(f"{stage}/rmse", getattr(self, f"{stage}_mse").compute().sqrt())

    def on_validation_epoch_end(self) -> None:
        self._log_derived("val")

    def on_test_epoch_end(self) -> None:
        self._log_derived("test")
        if self.task == "regression":
            return
        cm = self.test_confusion.compute().float()
        support = cm.sum(1)
        recall = cm.diag() / support.clamp_min(1)
        present = support > 0  # classes absent from the test set do not count
        self.log("test/balanced_acc", recall[present].mean() if present.any() else recall.new_tensor(float("nan")))
        self.test_per_class = [float(r) if p else float("nan") for r, p in zip(recall.tolist(), present.tolist())]
        self.test_confusion.reset()

    def configure_optimizers(self):
        groups = self.strategy.param_groups(self.model, self.hparams.lr)
        extra = [p for p in self.parameters() if p.requires_grad and not _in_groups(p, groups)]
        if extra:  # parameters a strategy added outside the model (regressors, discriminators)
            groups.append({"name": "strategy", "params": extra, "lr": self.hparams.lr})
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:  # no trainer needed (unit tests call this directly)
            return opt
        return configure_scheduler(self.scheduler_factory, opt, self.trainer)


class EpochSums:
    """A training epoch's running sums, on the device: a plain object, not module attributes
    (each ``nn.Module.__setattr__`` runs isinstance checks; five of them a step add up on
    an overhead-bound model)."""

    __slots__ = ("sums", "names", "count", "correct", "seen", "last")

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None
        self.names: list[str] = []
        self.correct: torch.Tensor | None = None
        self.count = self.seen = 0
        self.last: dict[str, torch.Tensor] = {}  # the latest step's loss terms

    def add_terms(self, row: torch.Tensor, names: list[str], n: int) -> None:
        self.sums, self.names = add_row(self.sums, self.names, row, names)
        self.count += n

    def add_correct(self, correct: torch.Tensor, n: int) -> None:
        self.correct = correct if self.correct is None else self.correct + correct
        self.seen += n


def add_row(sums: torch.Tensor | None, names: list[str], row: torch.Tensor,
            row_names: list[str]) -> tuple[torch.Tensor, list[str]]:
    """Epoch sums per named term (rows of ``sums``) plus this step's ``row``: one add when the
    step has the same terms as the sums; otherwise merged by name (a term that appears mid-epoch
    starts its own sum)."""
    if sums is None:
        return row, row_names
    if row_names == names:
        return sums + row, names
    merged = dict(zip(names, sums.unbind(0)))
    for name, value in zip(row_names, row.unbind(0)):
        merged[name] = merged[name] + value if name in merged else value.to(sums.dtype)
    return torch.stack(list(merged.values())), list(merged)


def _in_groups(p: torch.Tensor, groups: list[dict]) -> bool:
    return any(p is q for g in groups for q in g["params"])
