"""Wrapper layers for parameter-efficient transfer (PEFT style): wrap, don't rewrite.

Each wrapper holds the original module as ``base_layer`` and calls it; its own parameters carry
a unique name prefix (``adapter_``, ``lora_``), so freezing, counting and saving them are string
checks. Every wrapper starts as the identity change (its last factor is zero), so a wrapped
model computes exactly what the source computed until it trains.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from transfer_lab.errors import ConfigError

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class AdapterLayer(nn.Module):
    """Residual bottleneck adapter after a block: ``h + up(act(down(h)))`` with ``h = base(x)``.

    Works on ``(N, C, H, W)`` feature maps (1x1 convolutions) and ``(N, D)`` or ``(N, T, D)``
    features (linear on the last dim: a ViT block's tokens).
    ``up`` starts at zero, so the wrapped block starts as the source block (Houlsby et al., 2019).

    Args:
        base_layer: the block to wrap (kept, called, never edited).
        channels: width ``C`` (or ``D``) of the block's output.
        hidden: bottleneck width.
        spatial: True for 4-D feature maps, False for 2-D features.
        activation: ``relu`` or ``gelu``.
    """

    def __init__(self, base_layer: nn.Module, channels: int, hidden: int, spatial: bool,
                 activation: str = "relu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ConfigError(f"strategy.activation={activation!r}: valid: {', '.join(ACTIVATIONS)}")
        self.base_layer = base_layer
        if spatial:
            self.adapter_down = nn.Conv2d(channels, hidden, 1)
            self.adapter_up = nn.Conv2d(hidden, channels, 1)
        else:
            self.adapter_down = nn.Linear(channels, hidden)
            self.adapter_up = nn.Linear(hidden, channels)
        self.adapter_act = ACTIVATIONS[activation]()
        nn.init.zeros_(self.adapter_up.weight)
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        return h + self.adapter_up(self.adapter_act(self.adapter_down(h)))


class LoRALayer(nn.Module):
    """``W + (alpha / r) · B·A`` on a frozen ``nn.Linear`` or ``nn.Conv2d`` (Hu et al., 2021).

    For a convolution the update is a rank-``r`` factorisation over the whole kernel, as in
    PEFT: ``A`` is an ``r × C_in × k × k`` convolution with the base layer's stride, padding and
    dilation, ``B`` a ``C_out × r`` 1x1 convolution, so ``ΔW = B · A`` has the kernel's shape.
    ``B`` starts at zero; ``A`` gets Kaiming-uniform init (as in PEFT).

    Args:
        base_layer: ``nn.Linear`` or ``nn.Conv2d`` (``groups=1``).
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r``.
        dropout: dropout on the LoRA branch's input.
    """

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Conv2d):
            if base_layer.groups != 1:
                raise ConfigError(f"strategy=lora: grouped convolution (groups={base_layer.groups}) "
                                  "is not supported; leave it out of strategy.layers")
            shape_a = (r, base_layer.in_channels, *base_layer.kernel_size)
            shape_b = (base_layer.out_channels, r, 1, 1)
        elif isinstance(base_layer, nn.Linear):
            shape_a, shape_b = (r, base_layer.in_features), (base_layer.out_features, r)
        else:
            raise ConfigError(f"strategy=lora wraps nn.Linear and nn.Conv2d, not "
                              f"{type(base_layer).__name__}")
        self.base_layer = base_layer
        self.r, self.scaling = r, alpha / r
        ref = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(shape_a, dtype=ref.dtype, device=ref.device))
        self.lora_B = nn.Parameter(torch.zeros(shape_b, dtype=ref.dtype, device=ref.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        x = self.lora_dropout(x)
        if isinstance(self.base_layer, nn.Conv2d):
            b = self.base_layer
            h = F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation)
            return out + self.scaling * F.conv2d(h, self.lora_B)
        return out + self.scaling * F.linear(F.linear(x, self.lora_A), self.lora_B)

    def delta_weight(self) -> torch.Tensor:
        """``(alpha / r) · B·A`` in the base weight's shape."""
        if isinstance(self.base_layer, nn.Conv2d):
            w = self.lora_B.flatten(1) @ self.lora_A.flatten(1)
            return self.scaling * w.view_as(self.base_layer.weight)
        return self.scaling * self.lora_B @ self.lora_A

    @torch.no_grad()
    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight (a plain Linear/Conv2d)."""
        self.base_layer.weight.add_(self.delta_weight())
        return self.base_layer


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``root`` (keeps the parent's child order)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, name, new)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every ``LoRALayer`` into its base layer, in place; returns the plain model."""
    paths = [n for n, m in model.named_modules() if isinstance(m, LoRALayer)]
    for path in paths:
        replace_module(model, path, model.get_submodule(path).merged())
    return model


def output_shapes(model: nn.Module, paths: list[str],
                  input_shape: tuple[int, ...]) -> dict[str, torch.Size]:
    """Output shape of each module in ``paths`` for one dummy input (read by forward hooks)."""
    shapes: dict[str, torch.Size] = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda _m, _i, out, p=p: shapes.__setitem__(p, out.shape)) for p in paths]
    was_training = model.training
    model.eval()  # BatchNorm must not see the dummy batch as statistics
    try:
        ref = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(2, *input_shape, dtype=ref.dtype, device=ref.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return shapes
