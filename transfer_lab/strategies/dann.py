"""Domain-adversarial training (Ganin & Lempitsky, 2015).

The target stage trains on *labelled source* batches plus *unlabelled target* images. A domain
classifier on the backbone features sits behind a gradient-reversal layer: it learns to tell the
domains apart while the reversed gradient pushes the features to make that impossible. The
reversal weight follows the paper's schedule ``λ_p = 2 / (1 + exp(−γ·p)) − 1`` (γ = 10, ``p``
the training progress from 0 to 1), so early noisy domain gradients do not swamp the classifier.
As in TLlib's ``DomainAdversarialLoss``, the method is a loss module (``DomainAdversarialLoss``
below: reversal + discriminator + BCE); the strategy only wires it in.

Design choices (see experiments/domain_adaptation/README.md):

* ``needs_source = True``: the run hands us the source data module and the source model trained
  on it, which is the init. ``source_only`` starts from the same model and trains the same
  number of target-stage epochs on source data alone, so the two differ only in the
  adversarial term.
* Target *training* labels are never read: the paired data drops them
  (``PairedData(second_labels=False)``). Test uses the target split; validation (selection,
  tuning) the target's labelled split by default, the source's with ``validate_on=source``
  (no target label then chooses anything).
* The convergence check judges the task term (``convergence_term``): the domain term is
  adversarial and rises by design as λ grows.
* Each domain is normalised with its own training statistics (as any target run is).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from transfer_lab.data.paired import PairedData
from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.selection import check_validate_on, validation_data
from transfer_lab.strategies.base import Loss, Strategy, TaskLoss
from transfer_lab.strategies.common import GradientReversal, copy_model, grl_lambda


class DomainAdversarialLoss(nn.Module):
    """BCE of a domain discriminator behind gradient reversal: source features are domain 0,
    target features domain 1 (TLlib's ``DomainAdversarialLoss``)."""

    def __init__(self, feature_dim: int, hidden: int) -> None:
        super().__init__()
        self.grl = GradientReversal(0.0)
        self.discriminator = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(),
                                           nn.Linear(hidden, hidden), nn.ReLU(),
                                           nn.Linear(hidden, 1))

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        logits = self.discriminator(self.grl(torch.cat([f_s, f_t]))).squeeze(1)
        domain = torch.cat([f_s.new_zeros(len(f_s)), f_t.new_ones(len(f_t))])
        return F.binary_cross_entropy_with_logits(logits, domain)


class GRLSchedule(L.Callback):
    """Sets the reversal weight before each step from the training progress (global step over
    the run's total steps), so a resumed run continues the schedule where it stopped."""

    def __init__(self, grl: GradientReversal, gamma: float, lambda_max: float) -> None:
        self.grl, self.gamma, self.lambda_max = grl, gamma, lambda_max
        self.total = 1.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.total = max(1.0, float(trainer.estimated_stepping_batches))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        progress = min(1.0, trainer.global_step / self.total)  # host integers: no device sync
        self.grl.lambd = self.lambda_max * grl_lambda(progress, self.gamma)


class DANN(Strategy):
    """Domain-adversarial training from the source model, on labelled source + unlabelled target.

    Args:
        domain_weight: weight of the domain-classification loss.
        hidden: width of the two hidden layers of the domain classifier.
        gamma: steepness of the λ schedule (10 in the paper).
        lambda_max: λ reached at the end of training.
        validate_on: ``target`` (its labelled validation split) or ``source`` (no target label used).
    """

    convergence_term = "task"  # the domain term is adversarial: it need not fall

    def __init__(self, domain_weight: float = 1.0, hidden: int = 100, gamma: float = 10.0,
                 lambda_max: float = 1.0, validate_on: str = "target") -> None:
        super().__init__()
        self.validate_on = check_validate_on(validate_on, "dann")
        self.domain_weight, self.hidden, self.gamma, self.lambda_max = (
            domain_weight, hidden, gamma, lambda_max)
        self.adversary: DomainAdversarialLoss | None = None

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_model(source, target, "dann")
        self.adversary = DomainAdversarialLoss(target.feature_dim, self.hidden)
        return target

    def modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"domain_adversary": self._adversary()})

    def _adversary(self) -> DomainAdversarialLoss:
        if self.adversary is None:
            raise ConfigError("strategy=dann: build() has not run (the domain classifier is made there)")
        return self.adversary

    def datamodule(self, target_dm: L.LightningDataModule,
                   source_dm: L.LightningDataModule | None) -> L.LightningDataModule:
        if source_dm is None:
            raise ConfigError("strategy=dann trains on the source data; a source.checkpoint "
                              "without source data cannot be used")
        return PairedData(source_dm, second=target_dm, second_labels=False, evaluate=target_dm,
                          validate=validation_data(self.validate_on, target_dm, source_dm))

    def callbacks(self) -> list[L.Callback]:
        return [GRLSchedule(self._adversary().grl, self.gamma, self.lambda_max)]

    def loss(self, model: nn.Module, batch: Any, task_loss: TaskLoss) -> Loss:
        xs, ys, xt = batch
        feats = model.backbone(torch.cat([xs, xt]))
        f_s, f_t = feats[: len(xs)], feats[len(xs):]
        logits = model.head(f_s)
        # the source labels are the supervised task here; target class weights do not apply
        terms = {"task": F.cross_entropy(logits, ys),
                 "domain": self.domain_weight * self._adversary()(f_s, f_t)}
        return Loss(terms, logits, ys)

    def report(self) -> dict[str, Any]:
        return {"init": "source model", "domain_weight": self.domain_weight, "hidden": self.hidden,
                "gamma": self.gamma, "lambda_max": self.lambda_max, "validate_on": self.validate_on,
                "final_grl_lambda": None if self.adversary is None else self.adversary.grl.lambd}
