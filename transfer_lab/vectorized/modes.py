"""How a ``VectorizedModule`` evaluates its K seeds inside the one training step.

``vmap``: one ``functional_call`` under ``torch.vmap`` (batched kernels: ``bmm`` for linear
layers). ``loop``: the K seeds' ``functional_call`` one after the other, on views of the stacked
tensors (``unbind``). Both keep ONE Lightning step and ONE optimizer step over the K-stacked
parameters, and the same per-seed math (the gradient of slice k is seed k's own); they differ in
float reassociation only.

Why a loop at all: on a CPU, ``vmap`` runs a K-seed ``conv2d`` as one grouped convolution with
the seeds moved into the channels (a copy of the activations each way), and ``max_pool2d`` /
``batch_norm`` through reshapes and copies; for ``convnet`` at batch 64 that measured ~1.9× the
time of K ordinary calls (``experiments/benchmarks/README.md``). ``auto`` picks ``vmap`` on CUDA
(fewer, larger kernel launches are the point there) and for models without convolutions, the
per-seed ``loop`` for convolutional models on any other device, and the ``loop`` for K = 1.
"""

from __future__ import annotations

import torch
from torch import nn

from transfer_lab.errors import ConfigError

MODES = ("auto", "vmap", "loop")
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"vectorize_mode={mode!r}: valid: {', '.join(MODES)}")
    return mode


def has_convolutions(model: nn.Module) -> bool:
    return any(isinstance(m, _CONV) for m in model.modules())


def resolve_mode(mode: str, model: nn.Module, device: torch.device, k: int = 2) -> str:
    """``vmap`` or ``loop`` for ``mode`` (``auto``: see the module docstring) on ``device``, for
    ``k`` seeds (one seed is a loop of one: ``vmap`` would only add its own cost)."""
    if check_mode(mode) != "auto":
        return mode
    if k == 1:
        return "loop"
    if device.type == "cuda" or not has_convolutions(model):
        return "vmap"
    return "loop"


def unbind_all(tensors: dict[str, torch.Tensor], k: int) -> list[dict[str, torch.Tensor]]:
    """``{name: K×…}`` → K dicts ``{name: …}`` of views (one ``unbind`` per tensor: its backward
    stacks the K gradients once, where K ``t[k]`` selects would each scatter into a K×… zero)."""
    if not tensors:
        return [{} for _ in range(k)]
    columns = [t.unbind(0) for t in tensors.values()]
    return [dict(zip(tensors, row)) for row in zip(*columns)]


def vmap_cross_entropy(outputs: torch.Tensor, y: torch.Tensor,
                       class_weights: torch.Tensor | None) -> torch.Tensor:
    """F.cross_entropy's value (the class-weighted mean) in ops with direct vmap rules: under
    vmap F.cross_entropy runs a decomposition, ~1.4× this one's time (forward + backward)."""
    picked = outputs.log_softmax(-1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    if class_weights is None:
        return -picked.mean()
    w = class_weights.gather(0, y)
    return -(picked * w).sum() / w.sum()


def loop_seeds(one_seed, k: int, params: dict, aux: dict, class_weights: torch.Tensor | None,
               batch: tuple) -> tuple:
    """A vmapped ``one_seed``'s result (losses, outputs, targets, terms, each K-stacked),
    computed seed by seed on views of the stacked tensors."""
    cws = [None] * k if class_weights is None else class_weights.unbind(0)
    rows = [one_seed(p, a, cw, tuple(b[i] for b in batch))
            for i, (p, a, cw) in enumerate(zip(unbind_all(params, k), unbind_all(aux, k), cws))]
    losses, outputs, target, terms = zip(*rows)
    return (torch.stack(losses), torch.stack(outputs), torch.stack(target),
            {n: torch.stack([t[n] for t in terms]) for n in terms[0]})

