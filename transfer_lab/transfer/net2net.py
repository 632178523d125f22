"""Net2Net (Chen, Goodfellow & Shlens, 2016): grow a trained network without changing its function.

* ``net2wider(model, layer, width)`` gives ``layer`` (a ``Linear`` or ``Conv2d``) ``width``
  outputs: new units copy randomly chosen old ones (mapping ``g``), BatchNorm layers in between
  are widened by the same mapping, and the next ``Linear``/``Conv2d`` divides each incoming copy
  by the number of copies, so the sum it computes is unchanged.
* ``net2deeper(model, after)`` inserts an identity block (``Linear``/``3×3 Conv2d`` initialised
  to the identity, optional BatchNorm set to undo its normalisation, ``ReLU``) right after the
  block ``after``. ReLU is the identity on the non-negative outputs of a ReLU block, so the
  function is preserved.

Both work on chains (``mlp``, ``lenet``, ``convnet``: module order is forward order) and return a
new model; the input model is untouched. BatchNorm is exact in eval mode (running statistics);
in training mode a widened BN sees the same batch statistics per copy, so widening stays exact,
while an inserted BN standardises with batch statistics and is only approximately the identity.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from transfer_lab.errors import ConfigError

_BN = nn.modules.batchnorm._BatchNorm


def _set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, new)


def _like(m: nn.Module, n_in: int | None = None, n_out: int | None = None) -> nn.Module:
    """A fresh module of ``m``'s kind with other input/output sizes."""
    if isinstance(m, nn.Conv2d):
        if m.groups != 1:
            raise ConfigError(f"net2net: grouped convolutions are not supported ({m})")
        return nn.Conv2d(n_in or m.in_channels, n_out or m.out_channels, m.kernel_size, m.stride,
                         m.padding, m.dilation, 1, m.bias is not None, m.padding_mode)
    if isinstance(m, nn.Linear):
        return nn.Linear(n_in or m.in_features, n_out or m.out_features, m.bias is not None)
    if isinstance(m, _BN):
        return type(m)(n_out, m.eps, m.momentum, m.affine, m.track_running_stats)
    raise ConfigError(f"net2net: cannot resize a {type(m).__name__}")


def _out_size(m: nn.Module) -> int:
    return m.out_channels if isinstance(m, nn.Conv2d) else m.out_features


def _in_size(m: nn.Module) -> int:
    return m.in_channels if isinstance(m, nn.Conv2d) else m.in_features


@torch.no_grad()
def net2wider(model: nn.Module, layer: str, width: int, noise: float = 0.0,
              generator: torch.Generator | None = None) -> nn.Module:
    """A copy of ``model`` where ``layer`` has ``width`` outputs, computing the same function.

    Args:
        layer: module path of a ``Linear`` or ``Conv2d`` that is not the last such layer.
        width: new number of output units/channels (≥ the current one).
        noise: std of Gaussian noise, relative to the weights' std, added to the next layer's
            incoming weights of the copies to break symmetry (0: exactly function-preserving).
        generator: draws the mapping of new units to old ones (and the noise).
    """
    model = copy.deepcopy(model)
    chain = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, _BN))]
    names = [n for n, _ in chain]
    if layer not in names or isinstance(chain[names.index(layer)][1], _BN):
        raise ConfigError(f"net2wider: {layer!r} is not a Linear/Conv2d; candidates: "
                          f"{', '.join(n for n, m in chain if not isinstance(m, _BN))}")
    i = names.index(layer)
    old = chain[i][1]
    n_old = _out_size(old)
    if width < n_old:
        raise ConfigError(f"net2wider: {layer} has {n_old} outputs; width={width} would shrink it")
    consumer = next(((n, m) for n, m in chain[i + 1:] if not isinstance(m, _BN)), None)
    if consumer is None:
        raise ConfigError(f"net2wider: {layer} is the last layer; there is nothing to widen into")
    norms = [(n, m) for n, m in chain[i + 1:names.index(consumer[0])]
             if isinstance(m, _BN) and m.num_features == n_old]
    extra = torch.randint(0, n_old, (width - n_old,), generator=generator)
    g = torch.cat([torch.arange(n_old), extra])
    counts = torch.bincount(g, minlength=n_old)[g].float()

    wide = _like(old, n_out=width)
    wide.weight.copy_(old.weight[g])
    if old.bias is not None:
        wide.bias.copy_(old.bias[g])
    _set_module(model, layer, wide.to(old.weight.device))
    for n, bn in norms:
        new_bn = _like(bn, n_out=width)
        for key, v in bn.state_dict().items():
            new_bn.state_dict()[key].copy_(v[g] if v.ndim == 1 else v)
        _set_module(model, n, new_bn.to(old.weight.device))
    _widen_input(model, *consumer, g, counts, n_old, noise, generator)
    return model


def _widen_input(model: nn.Module, name: str, m: nn.Module, g: torch.Tensor, counts: torch.Tensor,
                 n_old: int, noise: float, generator: torch.Generator | None) -> None:
    n_in = _in_size(m)
    if n_in % n_old:
        raise ConfigError(f"net2wider: the next layer {name} takes {n_in} inputs, not a multiple of "
                          f"the {n_old} outputs being widened")
    k = n_in // n_old  # >1 when a Conv2d feeds a Linear through Flatten (k spatial positions each)
    idx = (g[:, None] * k + torch.arange(k)).flatten()
    scale = counts.repeat_interleave(k)
    new = _like(m, n_in=len(idx))
    shape = [1, len(idx)] + [1] * (m.weight.ndim - 2)
    w = m.weight[:, idx] / scale.view(shape).to(m.weight)
    if noise > 0:
        # only the copies (beyond the original units) get noise; the originals stay exact
        copies = torch.zeros(len(idx), dtype=torch.bool)
        copies[n_old * k:] = True
        eps = torch.randn(w.shape, generator=generator).to(w) * noise * m.weight.std()
        w = w + eps * copies.view(shape).to(w)
    new.weight.copy_(w)
    if m.bias is not None:
        new.bias.copy_(m.bias)
    _set_module(model, name, new.to(m.weight.device))
    if name.startswith("head") and hasattr(model, "feature_dim"):
        model.feature_dim = len(idx)


@torch.no_grad()
def net2deeper(model: nn.Module, after: str, name: str | None = None,
               batch_norm: bool | None = None) -> nn.Module:
    """A copy of ``model`` with an identity block inserted right after the block ``after``.

    Args:
        after: path of a block inside an ``nn.Sequential`` (e.g. ``"backbone.conv2"``) whose
            output is non-negative (ends in ReLU, possibly followed by pooling/dropout).
        name: name of the new block (default ``<block>_deeper``).
        batch_norm: add a BatchNorm (default: if the block has one).
    """
    model = copy.deepcopy(model)
    parent_path, _, block_name = after.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not isinstance(parent, nn.Sequential) or block_name not in parent._modules:
        raise ConfigError(f"net2deeper: {after!r} is not a block of an nn.Sequential")
    block = parent._modules[block_name]
    layers = [m for m in block.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        raise ConfigError(f"net2deeper: {after} holds no Linear/Conv2d to take the width from")
    last = layers[-1]
    if not any(isinstance(m, nn.ReLU) for m in block.modules()):
        raise ConfigError(f"net2deeper: {after} has no ReLU, so its output may be negative and an "
                          "identity block with ReLU would not preserve the function")
    if batch_norm is None:
        batch_norm = any(isinstance(m, _BN) for m in block.modules())
    c = _out_size(last)
    device = last.weight.device
    if isinstance(last, nn.Conv2d):
        lin: nn.Module = nn.Conv2d(c, c, 3, padding=1, bias=not batch_norm)
        lin.weight.zero_()
        lin.weight[torch.arange(c), torch.arange(c), 1, 1] = 1.0
        bn: nn.Module | None = nn.BatchNorm2d(c) if batch_norm else None
    else:
        lin = nn.Linear(c, c, bias=not batch_norm)
        lin.weight.copy_(torch.eye(c))
        bn = nn.BatchNorm1d(c) if batch_norm else None
    if getattr(lin, "bias", None) is not None:
        lin.bias.zero_()
    mods = [lin]
    if bn is not None:  # undo the normalisation: (x - 0) / sqrt(1 + eps) * sqrt(1 + eps) + 0
        bn.weight.fill_(math.sqrt(1.0 + bn.eps))
        bn.bias.zero_()
        mods.append(bn)
    mods.append(nn.ReLU(inplace=True))
    new_block = nn.Sequential(*mods).to(device)
    items = list(parent._modules.items())
    pos = [k for k, _ in items].index(block_name) + 1
    items.insert(pos, (name or f"{block_name}_deeper", new_block))
    parent._modules.clear()
    for k, v in items:
        parent.add_module(k, v)
    return model


@torch.no_grad()
def check_function(before: nn.Module, after: nn.Module, step: str, exact: bool = True,
                   tol: float = 1e-4) -> None:
    """Raise ``ConfigError`` (one line, naming ``step``) unless ``after`` runs on the model's input
    shape and — when ``exact`` — gives ``before``'s outputs (eval mode, to ``tol`` relative to
    the output scale). Net2Net's promise is checked, not assumed: a block that ends in
    ``Flatten`` or a residual stem breaks it."""
    shape = getattr(before, "input_shape", None)
    if shape is None:
        raise ConfigError(f"{step}: cannot check the grown model (it has no input_shape)")
    device = next(before.parameters()).device
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)).to(device)
    modes = before.training, after.training
    before.eval(), after.eval()
    try:
        want = before(x)
        try:
            got = after(x)
        except RuntimeError as e:
            reason = str(e).strip().splitlines()[0]
            raise ConfigError(f"{step}: the grown source model fails at its first forward ({reason}); "
                              "choose another layer/block") from None
    finally:
        before.train(modes[0]), after.train(modes[1])
    if got.shape != want.shape:
        raise ConfigError(f"{step}: the grown source model outputs {tuple(got.shape[1:])}, the source "
                          f"{tuple(want.shape[1:])}; choose another layer/block")
    diff = float((got - want).abs().max())
    if exact and diff > tol * (1.0 + float(want.abs().max())):
        raise ConfigError(f"{step}: the grown source model no longer computes the source's function "
                          f"(max output difference {diff:.3g}); choose another layer/block")
