from __future__ import annotations

from typing import Any

import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Loss, Strategy, TaskLoss
from transfer_lab.strategies.common import copy_backbone


class L2SP(Strategy):
    """Fine-tune with a pull toward the source weights (Li, Grandvalet & Davoine, 2018).

    Adds ``alpha/2 · ‖w − w_source‖²`` over every transferred backbone parameter and
    ``beta/2 · ‖w‖²`` over the new head. It replaces plain weight decay: the param groups set
    ``weight_decay=0`` whatever the optimizer config says, since decay toward zero would fight
    the pull toward the source.

    Args:
        alpha: strength of the pull toward the source backbone weights.
        beta: plain L2 strength on the new head.
    """

    tasks = ("classification", "regression")

    def __init__(self, alpha: float = 0.1, beta: float = 0.01) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ConfigError(f"strategy.alpha={alpha}, strategy.beta={beta}: must be ≥ 0")
        self.alpha, self.beta = alpha, beta
        self.reference: dict[str, torch.Tensor] = {}
        self.model: nn.Module | None = None

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "l2sp")
        # the starting point, detached: names are paths inside the built model
        self.reference = {f"backbone.{n}": p.detach().clone()
                          for n, p in target.backbone.named_parameters()}
        self.model = target
        return target

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        ps = [p for p in model.parameters() if p.requires_grad]
        return [{"name": "all", "params": ps, "lr": lr, "weight_decay": 0.0}]

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """``alpha/2·Σ‖w − w_src‖²`` (backbone) + ``beta/2·Σ‖w‖²`` (everything else trainable)."""
        if not self.reference:
            raise ConfigError("strategy=l2sp: penalty() before build(): no source reference")
        pull = new = None
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            ref = self.reference.get(name)
            if ref is not None:
                if ref.device != p.device:  # the model moved to the training device
                    ref = self.reference[name] = ref.to(p.device)
                term = (p - ref).pow(2).sum()
                pull = term if pull is None else pull + term
            else:
                term = p.pow(2).sum()
                new = term if new is None else new + term
        zero = next(model.parameters()).new_zeros(())
        return (0.5 * self.alpha * (zero if pull is None else pull)
                + 0.5 * self.beta * (zero if new is None else new))

    def loss(self, model: nn.Module, batch: Any, task_loss: TaskLoss) -> Loss:
        out = super().loss(model, batch, task_loss)
        return Loss({**out.terms, "l2sp": self.penalty(model)}, out.outputs, out.target)

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"alpha": self.alpha, "beta": self.beta}
        if self.model is not None and self.reference:
            with torch.no_grad():
                sq = sum(float((p.detach().cpu() - self.reference[n].cpu()).pow(2).sum())
                         for n, p in self.model.named_parameters() if n in self.reference)
            out["distance_to_source"] = sq ** 0.5  # ‖w − w_src‖ over the backbone, after training
        return out
