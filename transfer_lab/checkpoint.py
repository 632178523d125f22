"""Trainable-only checkpoints: strategies that freeze the backbone store just what trained.

A frozen backbone is the source's, so the file holds the trainable tensors (plus BatchNorm
buffers of trained parts) and the store key of the source; loading rebuilds the model from the
source and overlays the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.io import atomic_save_safetensors

FORMAT = "transfer_lab.trainable/1"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that require grad, and buffers of modules that have any trainable parameter."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for mname, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            for bname, b in m.named_buffers(recurse=False):
                if b is not None:
                    state[f"{mname}.{bname}" if mname else bname] = b.detach()
    return state


def save_trainable(model: nn.Module, path: str | Path, source_key: str | None) -> Path:
    """Write the trainable tensors atomically (temp file + rename: old file or new, never half)."""
    return atomic_save_safetensors(path, trainable_state(model),
                                   metadata={"source_key": json.dumps(source_key), "format": FORMAT})


def read_trainable(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a trainable-only checkpoint; anything else fails with one line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ConfigError(f"checkpoint {path}: no such file") from None
    except Exception as e:  # noqa: BLE001 — a truncated or foreign file: SafetensorError etc.
        raise ConfigError(f"checkpoint {path}: not a readable .safetensors file "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"checkpoint {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return tensors, meta


def load_trainable(model: nn.Module, path: str | Path, source_key: str | None = None) -> str | None:
    """Overlay a trainable-only checkpoint onto ``model`` (already built from its source).

    Returns the source key recorded in the file. Every tensor must match a model tensor's name,
    shape and dtype, and the recorded source key must be ``source_key`` when one is given (the
    overlay only means something on top of the source it was trained from), or nothing is loaded.
    """
    own = model.state_dict()
    tensors, meta = read_trainable(path)
    for k, v in tensors.items():
        if k not in own or own[k].shape != v.shape:
            raise ConfigError(f"checkpoint {path}: tensor {k} {tuple(v.shape)} does not fit the "
                              f"model ({tuple(own[k].shape) if k in own else 'no such tensor'})")
        if own[k].dtype != v.dtype:
            raise ConfigError(f"checkpoint {path}: tensor {k} is {v.dtype}, the model's is {own[k].dtype}")
    recorded = json.loads(meta.get("source_key", "null"))
    if source_key is not None and recorded != source_key:
        raise ConfigError(f"checkpoint {path}: trained on source {recorded}, not {source_key}")
    model.load_state_dict(tensors, strict=False)
    return recorded
