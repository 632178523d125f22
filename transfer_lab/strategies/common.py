"""Pieces several strategies share: copying and freezing weights, module globs, gradient reversal.

Strategies import from here, never from each other.
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier


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


def copy_model(source: Classifier | None, target: Classifier, strategy: str) -> None:
    """Copy the whole source model (backbone and head): both sides share one label space."""
    if source is None:
        raise ConfigError(f"strategy={strategy} needs a source model (trained on the source domain)")
    s, t = source.state_dict(), target.state_dict()
    bad = [k for k in t if k not in s or s[k].shape != t[k].shape]
    if bad:
        raise ConfigError(f"strategy={strategy}: source and target models differ at {bad[0]} "
                          "(same architecture and the same classes on both domains are required)")
    target.load_state_dict(s)


def freeze(module: nn.Module) -> None:
    """Stop gradients and put the module in eval mode (a teacher nobody trains stays so). Inside
    a ``TransferModule``, ``train()`` (called at each training epoch's start) decides the mode
    of the model's frozen parts: eval, except BatchNorm when the strategy's ``train_bn``."""
    for p in module.parameters():
        p.requires_grad_(False)
    module.eval()


def hold_frozen_in_eval(model: nn.Module, train_bn: bool = False) -> None:
    """Put every fully frozen submodule (it has parameters, none trains) in eval mode, children
    included, so neither BatchNorm statistics nor Dropout masks act there; with ``train_bn``
    BatchNorm layers inside them stay in training mode."""
    frozen: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        ps = list(m.parameters())
        if ps and not any(p.requires_grad for p in ps):
            frozen.append(m)
            return
        for child in m.children():
            visit(child)

    visit(model)
    for m in frozen:
        m.eval()
        if train_bn:
            for bn in m.modules():
                if isinstance(bn, nn.modules.batchnorm._BatchNorm):
                    bn.train()


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
    """Ganin & Lempitsky's schedule ``2 / (1 + exp(−γ·p)) − 1``: 0 at the start, → 1 as ``p`` → 1."""
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0
