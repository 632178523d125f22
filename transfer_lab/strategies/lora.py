from __future__ import annotations

from typing import Any

from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import copy_backbone, freeze, match_modules
from transfer_lab.strategies.peft_layers import LoRALayer, merge_lora, replace_module

PREFIX = "lora_"


class LoRA(Strategy):
    """Frozen source backbone + low-rank updates ``W + (alpha/r)·B·A`` on Linear/Conv2d layers.

    Each chosen layer is wrapped (``base_layer`` kept and called); ``B`` starts at zero, so the
    model starts exactly as the source. Only ``lora_*`` parameters and the new head train.
    After training, ``merge(model)`` folds every update into its base weight: a plain model,
    no LoRA modules, the same outputs. The run keeps the unmerged model so the trainable-only
    checkpoint holds just the factors and the head.

    Args:
        r: rank of each update.
        alpha: scale numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the LoRA branch input.
        layers: module-path globs of the layers to adapt (None: every ``nn.Linear`` and
            ungrouped ``nn.Conv2d`` in the backbone). Globs must hit Linear/Conv2d modules.
        train_bn: let BatchNorm statistics in the frozen backbone update.
    """

    def __init__(self, r: int = 4, alpha: float = 8.0, dropout: float = 0.0,
                 layers: list[str] | None = None, train_bn: bool = False) -> None:
        super().__init__()
        self.train_bn = train_bn
        if r < 1:
            raise ConfigError(f"strategy.r={r}: the rank must be ≥ 1")
        if not 0 <= dropout < 1:
            raise ConfigError(f"strategy.dropout={dropout}: must be in [0, 1)")
        self.r, self.alpha, self.dropout, self.layers = r, alpha, dropout, list(layers or [])
        self.wrapped: list[str] = []

    def chosen(self, model: Classifier) -> list[str]:
        if self.layers:
            paths = match_modules(model, self.layers, "strategy.layers")
            bad = [p for p in paths if not isinstance(model.get_submodule(p), (nn.Linear, nn.Conv2d))]
            if bad:
                raise ConfigError(f"strategy.layers: {bad[0]} is a "
                                  f"{type(model.get_submodule(bad[0])).__name__}; LoRA adapts "
                                  "nn.Linear and nn.Conv2d (use globs that hit those)")
            return paths
        return [f"backbone.{n}" for n, m in model.backbone.named_modules()
                if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "lora")
        freeze(target.backbone)
        self.wrapped = self.chosen(target)
        if not self.wrapped:
            raise ConfigError("strategy=lora: the backbone has no nn.Linear / nn.Conv2d to adapt")
        for path in self.wrapped:
            layer = target.get_submodule(path)
            replace_module(target, path, LoRALayer(layer, self.r, self.alpha, self.dropout))
        return target

    @staticmethod
    def merge(model: nn.Module) -> nn.Module:
        """Fold the LoRA updates into the base weights, in place; returns the plain model."""
        return merge_lora(model)

    def report(self) -> dict[str, Any]:
        return {"layers": self.wrapped, "r": self.r, "alpha": self.alpha, "prefix": PREFIX,
                "mergeable": True}
