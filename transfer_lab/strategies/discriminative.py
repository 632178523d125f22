from __future__ import annotations

from typing import Any

from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import copy_backbone


class Discriminative(Strategy):
    """Fine-tune everything with layer-wise learning-rate decay (Howard & Ruder, 2018).

    The head trains at the base LR; the last backbone block at ``decay × lr``, the one before it
    at ``decay² × lr``, and so on down to the first block (blocks are
    ``Classifier.named_blocks()``). Each block is one optimizer param group named by its module
    path, and the ladder is written to ``results.json["strategy_report"]["lr"]``.

    Args:
        decay: LR ratio between consecutive blocks, in (0, 1] (1 is plain fine-tuning).
    """

    def __init__(self, decay: float = 0.5) -> None:
        super().__init__()
        if not 0 < decay <= 1:
            raise ConfigError(f"strategy.decay={decay}: must be in (0, 1]")
        self.decay = decay
        self.ladder: dict[str, float] = {}

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "discriminative")
        return target

    def ladder_for(self, model: nn.Module, lr: float) -> dict[str, float]:
        """``{group name: lr}``: head first, then blocks from the output side down."""
        if not isinstance(model, Classifier):
            raise ConfigError(f"strategy=discriminative needs a Classifier, got {type(model).__name__}")
        blocks = [n for n, _ in model.named_blocks()]
        ladder = {"head": lr}
        for depth, name in enumerate(reversed(blocks), start=1):
            ladder[name] = lr * self.decay ** depth
        return ladder

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        self.ladder = self.ladder_for(model, lr)
        groups, seen = [], set()
        for name, group_lr in self.ladder.items():
            params = [p for p in model.get_submodule(name).parameters() if p.requires_grad]
            seen.update(id(p) for p in params)
            groups.append({"name": name, "params": params, "lr": group_lr})
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
        if rest:  # parameters outside head and blocks (none in the built-in models): base LR
            groups.append({"name": "other", "params": rest, "lr": lr})
            self.ladder["other"] = lr
        return [g for g in groups if g["params"]]

    def report(self) -> dict[str, Any]:
        return {"decay": self.decay, "lr": self.ladder}
