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
from safetensors.torch import save_file
from torch import nn

from transfer_lab.data.datamodule import ConfigError


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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tensors = {k: v.cpu().contiguous() for k, v in trainable_state(model).items()}
    save_file(tensors, str(tmp), metadata={"source_key": json.dumps(source_key),
                                          "format": "transfer_lab.trainable/1"})
    tmp.replace(path)
    return path


def load_trainable(model: nn.Module, path: str | Path) -> str | None:
    """Overlay a trainable-only checkpoint onto ``model`` (already built from its source).

    Returns the source key recorded in the file. Every tensor must match a model tensor's name
    and shape, or nothing is loaded.
    """
    own = model.state_dict()
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in tensors.items():
        if k not in own or own[k].shape != v.shape:
            raise ConfigError(f"checkpoint {path}: tensor {k} {tuple(v.shape)} does not fit the "
                              f"model ({tuple(own[k].shape) if k in own else 'no such tensor'})")
    model.load_state_dict(tensors, strict=False)
    return json.loads(meta.get("source_key", "null"))
