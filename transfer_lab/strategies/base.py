"""The strategy extension surface: one small class, every hook defaulted but ``build``'s policy.

A new strategy is one file in this package plus one YAML in ``conf/strategy/`` whose
``_target_`` points at the class; nothing else is edited.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier

if TYPE_CHECKING:
    import lightning as L

    from transfer_lab.module import TransferModule


class Strategy:
    """How knowledge moves from a source model into a target model.

    Hooks, in the order a run calls them:

    * ``build(source, target)`` — make the model that trains on the target task.
    * ``datamodule(target_dm, source_dm)`` — what the target stage trains on.
    * ``param_groups(model, lr)`` — what trains, at which learning rate.
    * ``training_loss(module, batch)`` — the loss; by default cross-entropy plus ``loss(...)``.
    * ``loss(module, batch, outputs)`` — extra terms (penalties, distillation, ...).
    * ``callbacks()`` — Lightning callbacks (e.g. unfreezing schedules).
    * ``report()`` — extra facts for ``results.json``.

    Args:
        train_bn: let BatchNorm layers inside frozen parts update their statistics.
    """

    needs_source: bool = True
    #: the target tasks this strategy's loss handles (a regression strategy opts in)
    tasks: tuple[str, ...] = ("classification",)
    #: compares cleanly only when source and target share one architecture
    same_architecture: bool = True

    def __init__(self, train_bn: bool = False) -> None:
        self.train_bn = train_bn
        self.name = type(self).__name__

    # --- hooks ------------------------------------------------------------------------------
    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        """Override to make the target model from the source. Default: copy the backbone."""
        copy_backbone(source, target, self.name)
        return target

    def datamodule(self, target_dm: L.LightningDataModule,
                   source_dm: L.LightningDataModule | None) -> L.LightningDataModule:
        return target_dm

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Override to set per-group learning rates. Default: every trainable parameter at ``lr``."""
        return [{"name": "all", "params": [p for p in model.parameters() if p.requires_grad],
                 "lr": lr}]

    def training_loss(self, module: TransferModule, batch: Any) -> torch.Tensor:
        x, y = batch
        outputs = module(x)
        loss = module.task_loss(outputs, y)  # cross-entropy (class-weighted), or MSE for regression
        extra = self.loss(module, batch, outputs)
        module.update_train_metric(outputs, y)
        return loss if extra is None else loss + extra

    def loss(self, module: TransferModule, batch: Any, outputs: torch.Tensor) -> torch.Tensor | None:
        """Override to add terms to the task loss (cross-entropy or MSE). Default: none."""
        return None

    def callbacks(self) -> list:
        return []

    def report(self) -> dict[str, Any]:
        return {}


# --- helpers strategies share -----------------------------------------------------------------
def copy_backbone(source: Classifier | None, target: Classifier, strategy: str) -> None:
    """Copy every backbone tensor from source to target; fail naming the first mismatch."""
    if source is None:
        raise ConfigError(f"strategy={strategy} needs a source model")
    src, tgt = source.backbone.state_dict(), target.backbone.state_dict()
    for k, v in tgt.items():
        if k not in src or src[k].shape != v.shape:
            got = tuple(src[k].shape) if k in src else "missing"
            raise ConfigError(
                f"strategy={strategy} copies the source backbone, but backbone.{k} differs "
                f"(target {tuple(v.shape)}, source {got}); use the same model on both sides, "
                "or strategy=weight_transfer / distill for different architectures")
    target.backbone.load_state_dict(src)


def freeze(module: nn.Module) -> None:
    """Stop gradients; BatchNorm statistics stay put too (``TransferModule.train`` honours it)."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def match_modules(model: nn.Module, patterns: list[str], key: str) -> list[str]:
    """Module paths matching any glob; a glob that matches nothing is a config error."""
    names = [n for n, _ in model.named_modules() if n]
    out: list[str] = []
    for pat in patterns:
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise ConfigError(f"{key}: {pat!r} matches no module; modules are e.g. "
                              f"{', '.join(names[:12])}")
        out += [h for h in hits if h not in out]
    return out
