from __future__ import annotations

from typing import Any

from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import copy_backbone, freeze, match_modules
from transfer_lab.strategies.peft_layers import AdapterLayer, output_shapes, replace_module

PREFIX = "adapter_"


class Adapter(Strategy):
    """Frozen source backbone + small residual bottleneck adapters after chosen blocks.

    Each chosen block is wrapped (``base_layer`` kept and called) by an adapter
    ``h + up(act(down(h)))`` whose ``up`` starts at zero, so the model starts exactly as the
    source. Only the adapters (parameters named ``adapter_*``) and the new head train.

    Args:
        layers: module-path globs of the blocks to wrap (None: every backbone block of
            ``Classifier.named_blocks()`` whose output is a 2-D or 4-D tensor).
        reduction: bottleneck width is ``max(min_hidden, C // reduction)`` for a ``C``-wide block.
        min_hidden: smallest bottleneck width.
        activation: ``relu`` or ``gelu``.
        train_bn: let BatchNorm statistics in the frozen backbone update.
    """

    def __init__(self, layers: list[str] | None = None, reduction: int = 8, min_hidden: int = 4,
                 activation: str = "relu", train_bn: bool = False) -> None:
        super().__init__()
        self.train_bn = train_bn
        if reduction < 1 or min_hidden < 1:
            raise ConfigError(f"strategy.reduction={reduction}, strategy.min_hidden={min_hidden}: "
                              "both must be ≥ 1")
        self.layers, self.reduction, self.min_hidden = list(layers or []), reduction, min_hidden
        self.activation = activation
        self.wrapped: dict[str, int] = {}

    def chosen(self, model: Classifier) -> list[str]:
        if self.layers:
            return match_modules(model, self.layers, "strategy.layers")
        return [n for n, _ in model.named_blocks()]

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "adapter")
        freeze(target.backbone)
        paths = self.chosen(target)
        shapes = output_shapes(target, paths, target.input_shape)
        for path in sorted(paths, key=lambda p: -p.count(".")):  # inner first: paths stay valid
            shape = shapes.get(path)
            if shape is None or len(shape) not in (2, 3, 4):
                if self.layers:  # asked for by name: say why it cannot be done
                    raise ConfigError(f"strategy.layers: {path} outputs shape "
                                      f"{None if shape is None else tuple(shape)}; adapters need "
                                      "(N, C, H, W), (N, T, D) or (N, D) outputs")
                continue
            c = int(shape[1] if len(shape) == 4 else shape[-1])  # tokens (ViT): adapt the last dim
            hidden = max(self.min_hidden, c // self.reduction)
            replace_module(target, path, AdapterLayer(target.get_submodule(path), c, hidden,
                                                      spatial=len(shape) == 4,
                                                      activation=self.activation))
            self.wrapped[path] = hidden
        if not self.wrapped:
            raise ConfigError("strategy=adapter: no block to wrap (set strategy.layers)")
        return target

    def report(self) -> dict[str, Any]:
        return {"adapters": self.wrapped, "prefix": PREFIX}
