"""Domain-adversarial training (Ganin & Lempitsky, 2015) and its data path.

The target stage trains on *labelled source* batches plus *unlabelled target* images. A domain
classifier on the backbone features sits behind a gradient-reversal layer: it learns to tell the
domains apart while the reversed gradient pushes the features to make that impossible. The
reversal weight follows the paper's schedule ``λ_p = 2 / (1 + exp(−γ·p)) − 1`` (γ = 10, ``p``
the training progress from 0 to 1), so early noisy domain gradients do not swamp the classifier.

Design choices (see experiments/domain_adaptation/README.md):

* ``needs_source = True``: the run hands us the source data module (only strategies that need a
  source get one) and the source model trained on it, which is the init. ``source_only`` starts
  from the same model and trains the same number of target-stage epochs on source data alone,
  so the two differ only in the adversarial term.
* Target *training* labels are never read: the target loader is built from the images alone
  (``DomainData``). Validation and test use the target splits through the normal path
  (validation labels only feed the logged ``val/acc``; nothing selects on it).
* Each domain is normalised with its own training statistics (as any target run is).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError
from transfer_lab.data.loader import BatchLoader
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.distill import AttachModules

if TYPE_CHECKING:
    from transfer_lab.module import TransferModule


class _ReverseGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lambd: float) -> torch.Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return -ctx.lambd * grad, None


class GradientReversal(nn.Module):
    """Identity forward; multiplies the gradient by ``-lambd`` on the way back."""

    def __init__(self, lambd: float = 1.0) -> None:
        super().__init__()
        self.lambd = lambd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReverseGrad.apply(x, self.lambd)


def grl_lambda(progress: float, gamma: float = 10.0) -> float:
    """Ganin & Lempitsky's schedule: 0 at the start, → 1 as ``progress`` → 1."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


class _Paired:
    """Source ``(x, y)`` batches, each with a batch of target images (cycled); an epoch is one
    pass over the source."""

    def __init__(self, source: BatchLoader, target: BatchLoader) -> None:
        self.source, self.target = source, target

    def __len__(self) -> int:
        return len(self.source)

    def set_epoch(self, epoch: int) -> None:
        """Put both loaders where an uninterrupted run would be at ``epoch`` (resume): each epoch
        restarts the target cycle, which wraps ceil(len(source) / len(target)) times."""
        self.source.set_epoch(epoch)
        self.target.set_epoch(epoch * math.ceil(len(self.source) / max(1, len(self.target))))

    def __iter__(self):
        it = iter(self.target)
        for xs, ys in self.source:
            try:
                xt, _ = next(it)
            except StopIteration:
                it = iter(self.target)
                xt, _ = next(it)
            yield xs, ys, xt


class DomainData(L.LightningDataModule):
    """Train on the labelled source split (+ unlabelled target images); validate/test on target.

    Args:
        source_dm, target_dm: prepared ``TransferDataModule``s.
        with_target: add a batch of target training images to every source batch.
    """

    def __init__(self, source_dm: TransferDataModule, target_dm: TransferDataModule,
                 with_target: bool) -> None:
        super().__init__()
        self.source_dm, self.target_dm, self.with_target = source_dm, target_dm, with_target

    def setup(self, stage: str | None = None) -> None:
        for dm in (self.source_dm, self.target_dm):
            dm.trainer = self.trainer  # so they move their tensors to the training device
            dm.setup(stage)

    def train_dataloader(self):
        src = self.source_dm.train_dataloader()
        if not self.with_target:
            return src
        t = self.target_dm
        # the images alone: a zero placeholder stands where the labels would be
        placeholder = torch.zeros(len(t.x_train), dtype=torch.long, device=t.x_train.device)
        tgt = BatchLoader(t.x_train, placeholder, t.batch_size, shuffle=True, seed=t.seed + 1)
        return _Paired(src, tgt)

    def val_dataloader(self):
        return self.target_dm.val_dataloader()

    def test_dataloader(self):
        return self.target_dm.test_dataloader()

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            xs, ys, *rest = batch
            out = (self.source_dm.transform(xs, True, ys), ys)  # ys: imbalance_remedy=augment
            return out + tuple(self.target_dm.transform(x, True) for x in rest)
        x, y = batch
        return self.target_dm.transform(x, False), y


def copy_model(source: Classifier | None, target: Classifier, strategy: str) -> None:
    """Copy the whole source model (backbone and head): both domains share one label space."""
    if source is None:
        raise ConfigError(f"strategy={strategy} needs a source model (trained on the source domain)")
    s, t = source.state_dict(), target.state_dict()
    bad = [k for k in t if k not in s or s[k].shape != t[k].shape]
    if bad:
        raise ConfigError(f"strategy={strategy}: source and target models differ at {bad[0]} "
                          "(same architecture and the same classes on both domains are required)")
    target.load_state_dict(s)


class DANN(Strategy):
    """Domain-adversarial training from the source model, on labelled source + unlabelled target.

    Args:
        domain_weight: weight of the domain-classification loss.
        hidden: width of the two hidden layers of the domain classifier.
        gamma: steepness of the λ schedule (10 in the paper).
        lambda_max: λ reached at the end of training.
        train_bn: see ``Strategy``.
    """

    def __init__(self, domain_weight: float = 1.0, hidden: int = 100, gamma: float = 10.0,
                 lambda_max: float = 1.0, train_bn: bool = False) -> None:
        super().__init__(train_bn)
        self.domain_weight, self.hidden, self.gamma, self.lambda_max = (
            domain_weight, hidden, gamma, lambda_max)
        self.grl = GradientReversal(0.0)
        self.domain_head = nn.Module()

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_model(source, target, "dann")
        d = target.feature_dim
        self.domain_head = nn.Sequential(self.grl, nn.Linear(d, self.hidden), nn.ReLU(),
                                         nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                                         nn.Linear(self.hidden, 1))
        return target

    def datamodule(self, target_dm: L.LightningDataModule,
                   source_dm: L.LightningDataModule | None) -> L.LightningDataModule:
        if source_dm is None:
            raise ConfigError("strategy=dann trains on the source data; a source.checkpoint "
                              "without source data cannot be used")
        return DomainData(source_dm, target_dm, with_target=True)

    def callbacks(self) -> list:
        return [AttachModules("dann_domain_head", self.domain_head)]

    def progress(self, module: TransferModule) -> float:
        try:
            total = module.trainer.estimated_stepping_batches
        except RuntimeError:  # no trainer attached (direct calls in tests)
            return 0.0
        return min(1.0, module.global_step / max(1.0, float(total)))

    def training_loss(self, module: TransferModule, batch: Any) -> torch.Tensor:
        xs, ys, xt = batch
        feats = module.model.backbone(torch.cat([xs, xt]))
        logits = module.model.head(feats[: len(xs)])
        ce = F.cross_entropy(logits, ys)
        self.grl.lambd = self.lambda_max * grl_lambda(self.progress(module), self.gamma)
        domain = torch.cat([torch.zeros(len(xs)), torch.ones(len(xt))]).to(feats)
        d_loss = F.binary_cross_entropy_with_logits(self.domain_head(feats).squeeze(1), domain)
        module.log("train/domain_loss", d_loss.detach(), on_step=False, on_epoch=True,
                   batch_size=len(feats))
        module.log("train/grl_lambda", self.grl.lambd, on_step=False, on_epoch=True,
                   batch_size=len(feats))
        module.train_acc.update(logits.detach(), ys)
        return ce + self.domain_weight * d_loss

    def report(self) -> dict[str, Any]:
        return {"init": "source model", "domain_weight": self.domain_weight, "hidden": self.hidden,
                "gamma": self.gamma, "lambda_max": self.lambda_max,
                "final_grl_lambda": self.grl.lambd}
