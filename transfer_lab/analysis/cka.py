"""Linear CKA (Kornblith et al., 2019) between layer representations, by module path.

CKA compares two representations of the *same* inputs: ``X`` (n × p1) and ``Y`` (n × p2), with
any widths. Linear CKA is ``‖Yᵀ X‖²_F / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F)`` on column-centred features; here
it is computed from the n × n Gram matrices, so a 25k-wide conv map costs no more than a
128-wide vector. It is 1 for identical representations and invariant to orthogonal transforms
and isotropic scaling, but not to arbitrary invertible linear maps (that is what makes it
informative for wide layers).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from transfer_lab.hooks import capture_features


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(len(x), -1).to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations of the same n inputs (first dim n, the rest flattened).

    Returns a value in [0, 1]; 0 when either representation is constant over the inputs.
    """
    if len(x) != len(y):
        raise ValueError(f"linear_cka: {len(x)} vs {len(y)} rows; both must describe the same inputs")
    k, l = _centred_gram(x), _centred_gram(y)
    # centring the features centres the Gram matrices: HSIC(K, L) ∝ ⟨K, L⟩_F
    hsic = (k * l).sum()
    norm = torch.linalg.norm(k) * torch.linalg.norm(l)
    return float(hsic / norm) if norm > 0 else 0.0


def cka_matrix(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> list[list[float]]:
    """``[i][j]`` = linear CKA of ``xs[i]`` and ``ys[j]`` (Gram matrices computed once each)."""
    kx = [_centred_gram(x) for x in xs]
    ky = [_centred_gram(y) for y in ys]
    nx = [torch.linalg.norm(k) for k in kx]
    ny = [torch.linalg.norm(k) for k in ky]
    return [[float((a * b).sum() / (na * nb)) if na * nb > 0 else 0.0 for b, nb in zip(ky, ny)]
            for a, na in zip(kx, nx)]


def default_layers(model: nn.Module) -> list[str]:
    """The module paths compared by default: each backbone block (input → output), then ``head``.

    Blocks are the children of ``model.backbone`` (or of the model without one), including
    parameter-free ones such as the final pooling (the penultimate features), but not a bare
    ``Flatten`` (it only reshapes its neighbour's output; on an MLP's input its CKA is 1 by
    construction).
    """
    root, prefix = (model.backbone, "backbone.") if isinstance(getattr(model, "backbone", None),
                                                               nn.Module) else (model, "")
    paths = [f"{prefix}{n}" for n, m in root.named_children()
             if not isinstance(m, nn.Flatten) and not (prefix == "" and n == "head")]
    if isinstance(getattr(model, "head", None), nn.Module):
        paths.append("head")
    return paths


@torch.no_grad()
def layer_features(model: nn.Module, x: torch.Tensor, paths: Sequence[str],
                   batch_size: int = 250) -> dict[str, torch.Tensor]:
    """``{path: (n, features)}`` for the named modules on inputs ``x`` (eval mode, flattened)."""
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {p: [] for p in paths}
    try:
        for xb in x.split(batch_size):
            feats = capture_features(model, xb, paths)
            for p in paths:
                chunks[p].append(feats[p].reshape(len(xb), -1).cpu())
    finally:
        model.train(was_training)
    return {p: torch.cat(c) for p, c in chunks.items()}
