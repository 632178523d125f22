"""How far each layer's weights moved from the source: ``‖w − w_src‖ / ‖w_src‖`` per module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def relative_drift(source: nn.Module, target: nn.Module, paths: Sequence[str]) -> dict[str, float | None]:
    """Relative weight change of each module (all its parameters together) from source to target.

    A module counts only when both models have it and every parameter tensor matches in name and
    shape (a different architecture, or a re-initialised head of another width, gives ``None``).
    Parameters only: BatchNorm running statistics are buffers, not weights.
    """
    src, tgt = dict(source.named_modules()), dict(target.named_modules())
    out: dict[str, float | None] = {}
    for path in paths:
        if path not in src or path not in tgt:
            out[path] = None
            continue
        ps, pt = dict(src[path].named_parameters()), dict(tgt[path].named_parameters())
        if not ps or ps.keys() != pt.keys() or any(ps[k].shape != pt[k].shape for k in ps):
            out[path] = None
            continue
        w_src = torch.cat([ps[k].detach().double().flatten() for k in ps])
        w_tgt = torch.cat([pt[k].detach().double().flatten().to(w_src.device) for k in ps])
        denom = torch.linalg.norm(w_src)
        out[path] = float(torch.linalg.norm(w_tgt - w_src) / denom) if denom > 0 else None
    return out
