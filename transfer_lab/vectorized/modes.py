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
