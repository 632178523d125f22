"""The strategy extension surface: one small class, every hook defaulted but ``build``.

A new strategy is one file in this package plus one YAML in ``conf/strategy/`` whose
``_target_`` points at the class; nothing else is edited. Shared pieces (copying, freezing,
module globs, gradient reversal) live in ``transfer_lab.strategies.common``; a strategy never
imports another strategy.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import lightning as L
import torch
from torch import nn

from transfer_lab.models.classifier import Classifier

TaskLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Loss(NamedTuple):
    """What a strategy's ``loss`` returns for one training batch.

    Attributes:
        terms: named loss terms, already weighted; the module sums them into the loss and logs
            each as ``train/<name>`` (epoch mean).
        outputs: the model's outputs on the labelled batch the train metric scores.
        target: that batch's labels.
    """

    terms: dict[str, torch.Tensor]
    outputs: torch.Tensor
    target: torch.Tensor


class Strategy:
    """How knowledge moves from a source model into a target model.

    The protocol (``TransferModule`` calls the hooks; a strategy never touches the module, its
    metrics, logger or trainer):

    * ``build(source, target) -> nn.Module`` — **required**: make the model that trains on the
      target task (copy, freeze, wrap, grow...). ``source`` is None when ``needs_source`` is False.
    * ``modules() -> nn.ModuleDict`` — trainable modules the strategy owns besides the model
      (hint regressors, a domain discriminator). The module registers them once: they move to
      the training device, join the optimizer and are saved in checkpoints. Default: none.
    * ``datamodule(target_dm, source_dm)`` — what the target stage trains on. A second training
      stream (source batches, target images, per-sample teacher logits) is a
      ``transfer_lab.data.paired.PairedData``, never a new wrapper. Default: ``target_dm``.
    * ``param_groups(model, lr)`` — what trains at which learning rate. Default: every
      trainable parameter of the model at ``lr``.
    * ``loss(model, batch, task_loss) -> Loss`` — the batch's named loss terms, plus the outputs
      and labels the train metric scores. ``task_loss(outputs, y)`` is the task's own loss
      (class-weighted cross-entropy, or MSE for regression). Default: ``{"task": task_loss}``.
    * ``callbacks()`` — Lightning callbacks (unfreezing schedules, λ schedules). Default: none.
    * ``report()`` — facts for ``results.json["strategy_report"]``. Default: none.

    Class attributes: ``needs_source`` (False: no source stage), ``tasks`` (the target tasks the
    loss handles), ``convergence_term`` (the loss term the convergence check judges, e.g. ``task``
    when another term is not meant to fall, as an adversarial one; None: the summed loss) and
    ``train_bn`` (BatchNorm layers inside frozen parts keep updating their
    statistics; only strategies that freeze something take it as an argument).
    """

    needs_source: bool = True
    tasks: tuple[str, ...] = ("classification",)
    convergence_term: str | None = None
    train_bn: bool = False

    def __init__(self) -> None:
        self.name = type(self).__name__

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        """Override to make the target model from the source model."""
        raise NotImplementedError(
            f"{self.name} must override build(source, target) -> nn.Module (e.g. "
            "transfer_lab.strategies.common.copy_backbone(source, target, name); return target)")

    def modules(self) -> nn.ModuleDict:
        """Override to declare trainable modules the strategy owns outside the model."""
        return nn.ModuleDict()

    def datamodule(self, target_dm: L.LightningDataModule,
                   source_dm: L.LightningDataModule | None) -> L.LightningDataModule:
        """Override to train on something else than the target data module."""
        return target_dm

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Override to set per-group learning rates."""
        return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad],
                 "lr": lr}]

    def loss(self, model: nn.Module, batch: Any, task_loss: TaskLoss) -> Loss:
        """Override to add loss terms or to train on another batch layout."""
        x, y = batch
        outputs = model(x)
        return Loss({"task": task_loss(outputs, y)}, outputs, y)

    def callbacks(self) -> list[L.Callback]:
        return []

    def report(self) -> dict[str, Any]:
        return {}
