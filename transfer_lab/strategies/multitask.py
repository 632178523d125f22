from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy, copy_backbone

if TYPE_CHECKING:
    from transfer_lab.module import TransferModule


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
        train_bn: unused here (nothing is frozen); kept for the common interface.
    """

    def __init__(self, source_weight: float = 1.0, target_weight: float = 1.0,
                 train_bn: bool = False) -> None:
        super().__init__(train_bn)
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
        return JointDataModule(target_dm, source_dm)

    def training_loss(self, module: TransferModule, batch: Any) -> torch.Tensor:
        (xt, yt), (xs, ys) = batch
        model = module.model
        if xt.shape[1:] == xs.shape[1:]:
            # one backbone pass over both: BatchNorm sees the mixed batch its running stats mirror
            feats = model.backbone(torch.cat([xt, xs]))
            ft, fs = feats[: len(xt)], feats[len(xt):]
        else:
            ft, fs = model.backbone(xt), model.backbone(xs)
        logits_t, logits_s = model.head(ft), model.source_head(fs)
        loss_t = F.cross_entropy(logits_t, yt, weight=module.class_weights)
        loss_s = F.cross_entropy(logits_s, ys)
        module.train_acc.update(logits_t.detach(), yt)
        if module._trainer is not None:
            module.log("train/source_loss", loss_s.detach(), on_step=False, on_epoch=True,
                       batch_size=len(ys))
        loss = self.target_weight * loss_t + self.source_weight * loss_s
        extra = self.loss(module, batch, logits_t)
        return loss if extra is None else loss + extra

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


class JointDataModule(L.LightningDataModule):
    """Training batches ``((x_t, y_t), (x_s, y_s))`` from the target and source data modules;
    validation and test batches are the target's. Each side is normalised (and augmented) by
    its own data module's ``transform``."""

    def __init__(self, target: TransferDataModule, source: TransferDataModule) -> None:
        super().__init__()
        self.target, self.source = target, source

    def setup(self, stage: str | None = None) -> None:
        for dm in (self.target, self.source):
            dm.trainer = self.trainer  # device placement and train/eval come from the trainer
            dm.setup(stage)

    def train_dataloader(self) -> JointLoader:
        return JointLoader(self.target.train_dataloader(), self.source.train_dataloader())

    def val_dataloader(self):
        return self.target.val_dataloader()

    def test_dataloader(self):
        return self.target.test_dataloader()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training
        if isinstance(batch[0], (tuple, list)):
            (xt, yt), (xs, ys) = batch
            return ((self.target.transform(xt, training, yt), yt),  # labels: imbalance_remedy=augment
                    (self.source.transform(xs, training, ys), ys))
        x, y = batch
        return self.target.transform(x, training), y


class JointLoader:
    """One pass over ``target`` per epoch, each batch paired with the next batch of a cycling
    ``source`` loader (which reshuffles at every wrap)."""

    def __init__(self, target, source) -> None:
        self.target, self.source = target, source
        self._source_iter: Iterator | None = None
        self._consumed = 0  # source batches drawn so far

    def __len__(self) -> int:
        return len(self.target)

    def set_epoch(self, epoch: int) -> None:
        """Put both loaders where an uninterrupted run would be at ``epoch`` (resume): the source
        has then given ``epoch · len(target)`` batches of its cycling passes."""
        if hasattr(self.target, "set_epoch"):
            self.target.set_epoch(epoch)
        consumed = epoch * len(self.target)
        if consumed == self._consumed or not hasattr(self.source, "set_epoch"):
            return  # the running source iterator is already there
        passes, offset = divmod(consumed, max(1, len(self.source)))
        self.source.set_epoch(passes)
        self._source_iter = iter(self.source)
        for _ in range(offset):
            next(self._source_iter)
        self._consumed = consumed

    def _next_source(self) -> Any:
        self._consumed += 1
        if self._source_iter is None:
            self._source_iter = iter(self.source)
        try:
            return next(self._source_iter)
        except StopIteration:
            self._source_iter = iter(self.source)
            return next(self._source_iter)

    def __iter__(self):
        for tb in itertools.islice(iter(self.target), len(self.target)):
            yield tb, self._next_source()
