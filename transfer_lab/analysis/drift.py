"""How far each layer's weights moved from the source: ``‖w − w_src‖ / ‖w_src‖`` per module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def relative_drift(source: nn.Module, target: nn.Module, paths: Sequence[str],
                   buffers: bool = False) -> dict[str, float | None]:
    """Relative weight change of each module (all its parameters together) from source to target.

    A module counts only when both models have it and every tensor matches in name and shape (a
    different architecture, or a re-initialised head of another width, gives ``None``).

    Args:
        buffers: compare the floating-point buffers (BatchNorm running mean/variance) instead of
            the parameters: fine-tuning re-estimates them on the target data even where the
            weights barely move, and that alone shifts the representation.
    """
    src, tgt = dict(source.named_modules()), dict(target.named_modules())
    out: dict[str, float | None] = {}
    for path in paths:
        if path not in src or path not in tgt:
            out[path] = None
            continue
        ps, pt = _tensors(src[path], buffers), _tensors(tgt[path], buffers)
        if not ps or ps.keys() != pt.keys() or any(ps[k].shape != pt[k].shape for k in ps):
            out[path] = None
            continue
        w_src = torch.cat([ps[k].detach().double().flatten() for k in ps])
        w_tgt = torch.cat([pt[k].detach().double().flatten().to(w_src.device) for k in ps])
        denom = torch.linalg.norm(w_src)
        out[path] = float(torch.linalg.norm(w_tgt - w_src) / denom) if denom > 0 else None
    return out


def _tensors(module: nn.Module, buffers: bool) -> dict[str, torch.Tensor]:
    if not buffers:
        return dict(module.named_parameters())
    return {k: b for k, b in module.named_buffers() if b is not None and b.is_floating_point()}
