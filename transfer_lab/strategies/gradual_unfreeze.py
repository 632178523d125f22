from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from torch import nn
from torch.optim import Optimizer

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import copy_backbone, freeze


class GradualUnfreeze(Strategy):
    """Start with the source backbone frozen (head only), unfreeze blocks top-down on a schedule.

    The ``k``-th block from the output side (``k = 0, 1, ...`` over ``Classifier.named_blocks()``)
    is unfrozen at the start of epoch ``start + k·every`` (or ``schedule[k]``), as a new
    optimizer param group named after the block at ``lr_ratio × lr`` (Howard & Ruder, 2018).
    The schedule runs in a Lightning ``BaseFinetuning`` callback, which also restores the
    trainable set and the param groups when a run resumes from a checkpoint.

    Args:
        start: epoch at which the last block is unfrozen.
        every: epochs between two unfreezes.
        schedule: explicit unfreeze epochs, last block first (overrides ``start``/``every``);
            shorter than the number of blocks leaves the earliest blocks frozen.
        lr_ratio: learning rate of each unfrozen block relative to the base LR.
        train_bn: let BatchNorm statistics of still-frozen blocks update.
    """

    def __init__(self, start: int = 2, every: int = 2, schedule: list[int] | None = None,
                 lr_ratio: float = 0.1, train_bn: bool = False) -> None:
        super().__init__()
        self.train_bn = train_bn
        if start < 0 or every < 1:
            raise ConfigError(f"strategy.start={start}, strategy.every={every}: need start ≥ 0, every ≥ 1")
        if schedule is not None and any(e < 0 for e in schedule):
            raise ConfigError(f"strategy.schedule={list(schedule)}: epochs must be ≥ 0")
        if lr_ratio <= 0:
            raise ConfigError(f"strategy.lr_ratio={lr_ratio}: must be > 0")
        self.start, self.every, self.lr_ratio = start, every, lr_ratio
        self.schedule = list(schedule) if schedule is not None else None
        self.plan: dict[str, int] = {}
        self.model: nn.Module | None = None

    def plan_for(self, model: Classifier) -> dict[str, int]:
        """``{block path: unfreeze epoch}``, output side first."""
        blocks = [n for n, _ in reversed(model.named_blocks())]
        if self.schedule is None:
            return {b: self.start + k * self.every for k, b in enumerate(blocks)}
        if len(self.schedule) > len(blocks):
            raise ConfigError(f"strategy.schedule={self.schedule}: {len(self.schedule)} epochs for "
                              f"{len(blocks)} blocks ({', '.join(blocks)})")
        return dict(zip(blocks, self.schedule))

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "gradual_unfreeze")
        freeze(target.backbone)  # params.trainable then counts the head: what epoch 0 trains
        self.plan = self.plan_for(target)
        self.model = target
        return target

    def callbacks(self) -> list:
        return [UnfreezeSchedule(self.lr_ratio)]

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"unfreeze_epoch": self.plan, "lr_ratio": self.lr_ratio}
        if self.model is not None:  # results.json params.trainable counts epoch 0 (head only)
            out["trainable_at_end"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return out


class UnfreezeSchedule(BaseFinetuning):
    """Freezes ``pl_module.model``'s backbone before training and unfreezes its blocks per epoch.

    Lightning's ``BaseFinetuning`` restores the optimizer param groups on resume, but not
    ``requires_grad``: the fresh run re-freezes the backbone in ``setup`` and an
    ``if epoch == k`` schedule never fires again for past epochs, so a block unfrozen before the
    checkpoint would sit in the optimizer with no gradient. Here the unfrozen blocks are part of
    the callback state and made trainable again in ``on_fit_start``, and ``finetune_function``
    unfreezes every block whose epoch has come (``>=``), adding only groups the optimizer lacks.
    """

    def __init__(self, lr_ratio: float) -> None:
        super().__init__()
        self.lr_ratio = lr_ratio
        self.unfrozen: list[str] = []

    @staticmethod
    def _plan(pl_module: L.LightningModule) -> dict[str, int]:
        strategy, model = getattr(pl_module, "strategy", None), getattr(pl_module, "model", None)
        if not isinstance(strategy, GradualUnfreeze) or not isinstance(model, Classifier):
            raise ConfigError("UnfreezeSchedule needs a TransferModule with a GradualUnfreeze "
                              "strategy and a Classifier `model`")
        if not strategy.plan:
            strategy.plan = strategy.plan_for(model)
        return strategy.plan

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen": list(self.unfrozen)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.unfrozen = list(state_dict.get("unfrozen", []))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # BaseFinetuning freezes at every setup; trainer.test() after fit must not re-freeze what
        # trained (the run's checkpoint would then store the head only)
        if stage == "fit":
            super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Override of BaseFinetuning: the whole backbone frozen, BatchNorm statistics too."""
        self._plan(pl_module)
        freeze(pl_module.model.backbone)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.unfrozen:  # resumed: the blocks trained before the checkpoint
            self._make_trainable(pl_module, name)
        super().on_fit_start(trainer, pl_module)  # restores the param groups by parameter name

    def _make_trainable(self, pl_module: L.LightningModule, name: str) -> None:
        # the mode (training for this block, eval for still-frozen ones unless train_bn) is set by
        # TransferModule.on_train_epoch_start, which runs after this callback's hook
        for p in pl_module.model.get_submodule(name).parameters():
            p.requires_grad_(True)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Override of BaseFinetuning: unfreeze each block whose epoch has come."""
        base_lr = pl_module.hparams.lr
        for name, at in self._plan(pl_module).items():
            if epoch < at:
                continue
            self._make_trainable(pl_module, name)
            if name not in self.unfrozen:
                self.unfrozen.append(name)
            have = {id(p) for g in optimizer.param_groups for p in g["params"]}
            # identity, not BaseFinetuning.filter_on_optimizer's torch.equal (equal values ≠ same tensor)
            new = [p for p in pl_module.model.get_submodule(name).parameters() if id(p) not in have]
            if new:
                optimizer.add_param_group({"name": name, "params": new,
                                           "lr": base_lr * self.lr_ratio})
