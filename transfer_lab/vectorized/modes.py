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


def backward_per_seed(trainer, trainable: list[str]) -> list[str] | None:
    """The trainable names for ``loop_seeds``' per-seed backward, or None for one backward over
    the K graphs: when nothing trains, grad is off, or the precision plugin scales the loss
    (``16-mixed``: a seed's own backward would run unscaled, where its separate run's is scaled)."""
    plugin = getattr(trainer, "precision_plugin", None)
    if not trainable or not torch.is_grad_enabled() or getattr(plugin, "scaler", None) is not None:
        return None
    return trainable


class _Deposit(torch.autograd.Function):
    """``value`` (the step's summed loss, already differentiated seed by seed) as a loss whose
    backward hands each stacked parameter its K-stacked gradient, times the incoming gradient
    (1, or Lightning's 1/accumulate_grad_batches)."""

    @staticmethod
    def forward(ctx, value, grads, *params):
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return (None, None, *(None if G is None else G * g for G in ctx.grads))


def loop_seeds(one_seed, k: int, params: dict, aux: dict, class_weights: torch.Tensor | None,
               batch: tuple, trainable: list[str] | None = None) -> tuple:
    """A vmapped ``one_seed``'s result (losses, outputs, targets, terms, each K-stacked) computed
    seed by seed on views of the stacked tensors, and the loss to back-propagate (their sum).

    With ``trainable`` (``backward_per_seed``), each seed's backward runs right after its forward
    (``torch.autograd.grad`` on leaf views of its slices): one seed's activations are alive at a
    time, as in its separate run, where one backward over all K graphs keeps K seeds' activations
    (convnet, batch 64: ~30 MB each) and the allocator returns and re-faults that memory every
    step. The returned loss then carries the K gradients to the stacked parameters (``_Deposit``)."""
    cws = [None] * k if class_weights is None else class_weights.unbind(0)
    # per-seed backward: each seed's slices become leaves of its own graph
    views = params if trainable is None else {n: t.detach() for n, t in params.items()}
    rows, grads = [], []
    for i, (p, a, cw) in enumerate(zip(unbind_all(views, k), unbind_all(aux, k), cws)):
        if trainable is None:
            rows.append(one_seed(p, a, cw, tuple(b[i] for b in batch)))
            continue
        leaves = [p[n].requires_grad_() for n in trainable]
        loss, out, target, terms = one_seed(p, a, cw, tuple(b[i] for b in batch))
        with torch.autocast(loss.device.type, enabled=False):  # backward outside autocast, as Lightning's
            grads.append(torch.autograd.grad(loss, leaves, allow_unused=True))
        rows.append((loss.detach(), out.detach(), target, {n: t.detach() for n, t in terms.items()}))
    losses, outputs, target, terms = zip(*rows)
    losses = torch.stack(losses)
    stacked = (losses, torch.stack(outputs), torch.stack(target),
               {n: torch.stack([t[n] for t in terms]) for n in terms[0]})
    if trainable is None:
        return (*stacked, losses.sum())
    per_name = [_stack_grads(gs) for gs in zip(*grads)]
    return (*stacked, _Deposit.apply(losses.sum(), per_name, *(params[n] for n in trainable)))


def _stack_grads(grads: tuple) -> torch.Tensor | None:
    """K seeds' gradients of one tensor, stacked; None when no seed's loss used it (a separate
    run's ``.grad`` stays None then; the optimizer skips it)."""
    if all(g is None for g in grads):
        return None
    like = next(g for g in grads if g is not None)
    return torch.stack([torch.zeros_like(like) if g is None else g for g in grads])
