"""Copy weights between *different* architectures: match layers, copy or adapt, report.

Layers are the modules that hold their own parameters or buffers (``Conv2d``, ``Linear``,
``BatchNorm*``, ...). A target layer is paired with a source layer of the same type

1. by name (same module path), then
2. by order within the type, among what is still unpaired (the k-th leftover ``Conv2d`` of the
   target takes the k-th leftover ``Conv2d`` of the source).

A pair whose tensors agree in shape is **copied**; otherwise it is **adapted** tensor by tensor:
channel/unit dimensions are sliced (target smaller) or tiled cyclically (target larger), kernel
dimensions are centre-cropped or zero-padded. When an *input* dimension is tiled, each copy of a
column is divided by how often it occurs, so a layer fed with tiled inputs computes what the
source layer computed (the deterministic form of Net2Net's widening). A first convolution whose
input channels differ (grey ↔ RGB) gets the source's kernels averaged over input channels,
repeated and scaled by ``C_source / C_target``, so a grey image repeated into RGB gives the
source's response. A target layer without a counterpart keeps its fresh initialisation
(**reinitialised**).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIONS = ("copied", "adapted", "reinitialised")


def param_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules with their own parameters or buffers, in registration (= forward, for chains) order."""
    return [(n, m) for n, m in model.named_modules()
            if any(True for _ in m.parameters(recurse=False))
            or any(b is not None for _, b in m.named_buffers(recurse=False))]


def _excluded(name: str, exclude: Sequence[str]) -> bool:
    return any(name == e or name.startswith(e + ".") for e in exclude)


def match_layers(source: nn.Module, target: nn.Module,
                 exclude: Sequence[str] = ()) -> dict[str, str | None]:
    """``{target layer: source layer or None}``: by name first, then by order within type."""
    src = [(n, m) for n, m in param_layers(source) if not _excluded(n, exclude)]
    tgt = [(n, m) for n, m in param_layers(target) if not _excluded(n, exclude)]
    src_by_name = dict(src)
    pairs: dict[str, str | None] = {n: None for n, _ in tgt}
    used: set[str] = set()
    for n, m in tgt:
        if n in src_by_name and type(src_by_name[n]) is type(m):
            pairs[n] = n
            used.add(n)
    for kind in dict.fromkeys(type(m) for _, m in tgt):
        src_left = [n for n, m in src if type(m) is kind and n not in used]
        tgt_left = [n for n, m in tgt if type(m) is kind and pairs[n] is None]
        for t, s in zip(tgt_left, src_left):
            pairs[t] = s
    return pairs


def adapt_tensor(src: torch.Tensor, shape: Sequence[int], input_dim: int | None = None,
                 spatial_from: int | None = None) -> torch.Tensor:
    """Slice/tile ``src`` to ``shape`` dimension by dimension (see the module docstring).

    Args:
        input_dim: the dimension that indexes the layer's inputs (its tiled copies are rescaled).
        spatial_from: first kernel dimension (centre-crop / zero-pad instead of slice / tile).
    """
    out = src
    for d, n_t in enumerate(shape):
        n_s = out.shape[d]
        if n_s == n_t:
            continue
        if spatial_from is not None and d >= spatial_from:
            out = _crop_or_pad(out, d, n_t)
            continue
        idx = torch.arange(n_t, device=out.device) % n_s
        out = out.index_select(d, idx)
        if d == input_dim and n_t > n_s:
            counts = torch.bincount(idx, minlength=n_s)[idx].to(out.dtype)
            view = [1] * out.ndim
            view[d] = n_t
            out = out / counts.view(view)
    return out


def _crop_or_pad(t: torch.Tensor, d: int, n: int) -> torch.Tensor:
    size = t.shape[d]
    if n < size:
        start = (size - n) // 2
        return t.narrow(d, start, n)
    pad = [0, 0] * t.ndim
    before = (n - size) // 2
    # F.pad lists dimensions last-first
    pad[2 * (t.ndim - 1 - d)], pad[2 * (t.ndim - 1 - d) + 1] = before, n - size - before
    return F.pad(t, pad)


def _is_first_conv(name: str, model: nn.Module) -> bool:
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return bool(convs) and convs[0] == name


def _adapt_layer(t_name: str, t_mod: nn.Module, s_name: str, s_mod: nn.Module,
                 first_conv: bool) -> tuple[str, dict, dict]:
    s_state = s_mod.state_dict(keep_vars=False)
    t_state = t_mod.state_dict(keep_vars=False)
    new, adapted = {}, False
    for key, t_val in t_state.items():
        if key not in s_state:
            continue
        s_val = s_state[key].to(t_val.device)
        if t_val.is_floating_point():
            s_val = s_val.to(t_val.dtype)
        if s_val.shape == t_val.shape:
            new[key] = s_val.clone()
            continue
        adapted = True
        if s_val.ndim != t_val.ndim:
            new[key] = t_val  # no meaningful mapping between ranks: keep the fresh tensor
            continue
        is_weight = key == "weight" and isinstance(t_mod, (nn.Conv2d, nn.Linear))
        if first_conv and key == "weight" and s_val.shape[1] != t_val.shape[1]:
            c_s, c_t = s_val.shape[1], t_val.shape[1]
            s_val = s_val.mean(dim=1, keepdim=True).repeat(1, c_t, 1, 1) * (c_s / c_t)
        new[key] = adapt_tensor(s_val, t_val.shape, input_dim=1 if is_weight else None,
                                spatial_from=2 if isinstance(t_mod, nn.Conv2d) else None)
    t_mod.load_state_dict({**t_state, **new})
    return ("adapted" if adapted else "copied"), _shapes(t_state), _shapes(s_state)


def _shapes(state: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in state.items() if v.ndim > 0}


@torch.no_grad()
def transfer_weights(source: nn.Module, target: nn.Module,
                     exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Initialise ``target`` from ``source`` in place; return one report row per target layer.

    Args:
        exclude: module-path prefixes left at their fresh init on both sides (e.g. ``["head"]``
            when the target task has different classes).

    Returns:
        Rows ``{"layer", "type", "action", "source", "target_shape", "source_shape"}`` with
        ``action`` one of ``copied``, ``adapted``, ``reinitialised``.
    """
    pairs = match_layers(source, target, exclude)
    src_mods = dict(source.named_modules())
    report = []
    for t_name, t_mod in param_layers(target):
        row: dict[str, Any] = {"layer": t_name, "type": type(t_mod).__name__, "source": None,
                               "target_shape": _shapes(t_mod.state_dict()), "source_shape": None}
        s_name = pairs.get(t_name)
        if s_name is None:
            row["action"] = "reinitialised"
            if _excluded(t_name, exclude):
                row["note"] = "excluded"
        else:
            first = _is_first_conv(t_name, target) and _is_first_conv(s_name, source)
            row["action"], _, row["source_shape"] = _adapt_layer(t_name, t_mod, s_name,
                                                                 src_mods[s_name], first)
            row["source"] = s_name
        report.append(row)
    return report


def summarize(report: list[dict[str, Any]]) -> dict[str, int]:
    return {a: sum(r["action"] == a for r in report) for a in ACTIONS}


def format_report(report: list[dict[str, Any]]) -> str:
    """A fixed-width table of the per-layer report, one line per target layer."""
    def shape(s: dict | None) -> str:
        if not s:
            return "-"
        return "x".join(map(str, s.get("weight") or next(iter(s.values()))))

    w = max([len(r["layer"]) for r in report] + [5])
    lines = [f"{'layer':<{w}}  {'type':<12} {'action':<13} {'target':<14} {'source':<14} from"]
    for r in report:
        lines.append(f"{r['layer']:<{w}}  {r['type']:<12} {r['action']:<13} "
                     f"{shape(r['target_shape']):<14} {shape(r['source_shape']):<14} "
                     f"{r['source'] or r.get('note', '-')}")
    counts = summarize(report)
    lines.append(", ".join(f"{n} {a}" for a, n in counts.items()))
    return "\n".join(lines)
