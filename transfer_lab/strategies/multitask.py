"""Multi-task learning with hard parameter sharing: the source task keeps training beside the target."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.data.paired import PairedData
from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Loss, Strategy, TaskLoss
from transfer_lab.strategies.common import copy_backbone


class MultiTaskClassifier(Classifier):
    """A ``Classifier`` with a second head for the source task on the same backbone.

    ``forward`` is the target task's (what validation, testing and the run see);
    ``forward_source`` is the source task's.
    """

    def __init__(self, target: Classifier, source_head: nn.Module) -> None:
        super().__init__(target.backbone, target.head, target.feature_dim, target.input_shape)
        self.source_head = source_head

    def forward_source(self, x: torch.Tensor) -> torch.Tensor:
        return self.source_head(self.backbone(x))


class MultiTask(Strategy):
    """Hard parameter sharing: one backbone, source and target heads trained jointly.

    The backbone and the source head start from the source model; the target head is new. Each
    training step takes one target batch and one source batch (the source loader cycles; an epoch
    is one pass over the target data) and minimises
    ``target_weight · CE(target) + source_weight · CE(source)``. Validation and testing run on the
    target data as usual; the source task's final test accuracy goes to
    ``results.json["strategy_report"]["source_task"]``.

    Args:
        source_weight: weight of the source-task loss.
        target_weight: weight of the target-task loss.
    """

    def __init__(self, source_weight: float = 1.0, target_weight: float = 1.0) -> None:
        super().__init__()
        if source_weight < 0 or target_weight <= 0:
            raise ConfigError(f"strategy.source_weight={source_weight}, strategy.target_weight="
                              f"{target_weight}: need source_weight ≥ 0 and target_weight > 0")
        self.source_weight, self.target_weight = source_weight, target_weight
        self.model: MultiTaskClassifier | None = None
        self.source_dm: TransferDataModule | None = None

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "multitask")
        self.model = MultiTaskClassifier(target, copy.deepcopy(source.head))
        return self.model

    def datamodule(self, target_dm: L.LightningDataModule,
                   source_dm: L.LightningDataModule | None) -> L.LightningDataModule:
        if source_dm is None:
            raise ConfigError("strategy=multitask trains on the source data too, but there is no "
                              "source data module (source.checkpoint is set?); use source.data")
        self.source_dm = source_dm
        return PairedData(target_dm, second=source_dm)

    def loss(self, model: nn.Module, batch: Any, task_loss: TaskLoss) -> Loss:
        xt, yt, (xs, ys) = batch
        if xt.shape[1:] == xs.shape[1:]:
            # one backbone pass over both: BatchNorm sees the mixed batch its running stats mirror
            feats = model.backbone(torch.cat([xt, xs]))
            ft, fs = feats[: len(xt)], feats[len(xt):]
        else:
            ft, fs = model.backbone(xt), model.backbone(xs)
        logits_t = model.head(ft)
        terms = {"task": self.target_weight * task_loss(logits_t, yt),
                 "source": self.source_weight * F.cross_entropy(model.source_head(fs), ys)}
        return Loss(terms, logits_t, yt)

    @torch.no_grad()
    def source_accuracy(self) -> dict[str, float]:
        """Test loss/accuracy of the source head on the source task's test set."""
        model, dm = self.model, self.source_dm
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        correct, loss, n = 0, 0.0, 0
        try:
            for i in range(0, len(dm.y_test), dm.eval_batch_size):
                x = dm.transform(dm.x_test[i:i + dm.eval_batch_size].to(device), False)
                y = dm.y_test[i:i + dm.eval_batch_size].to(device)
                logits = model.forward_source(x)
                correct += int((logits.argmax(1) == y).sum())
                loss += float(F.cross_entropy(logits, y, reduction="sum"))
                n += len(y)
        finally:
            model.train(was_training)
        return {"test/acc": correct / max(n, 1), "test/loss": loss / max(n, 1)}

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source_weight": self.source_weight,
                               "target_weight": self.target_weight}
        if self.model is not None and self.source_dm is not None:
            out["source_task"] = self.source_accuracy()
        return out
