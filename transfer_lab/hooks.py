"""Intermediate features by forward hooks keyed by module path (never by editing ``forward``).

    with FeatureCapture(model, ["backbone.conv2", "backbone.pool"]) as feats:
        logits = model(x)
    feats["backbone.conv2"]  # (N, C, H, W): what that module returned during the forward

Used by distillation (hint and attention losses) and by representation analyses (CKA).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from transfer_lab.errors import ConfigError


def resolve_modules(model: nn.Module, paths: Iterable[str], key: str = "layers") -> dict[str, nn.Module]:
    """``{path: module}`` for each module path; a path that does not exist fails naming it."""
    named = dict(model.named_modules())
    out: dict[str, nn.Module] = {}
    for path in paths:
        if path not in named:
            near = [n for n in named if n and (n.startswith(path.rsplit(".", 1)[0]) or path in n)]
            hint = near[:8] or [n for n in named if n][:12]
            raise ConfigError(f"{key}: no module {path!r} in {type(model).__name__}; "
                              f"module paths are e.g. {', '.join(hint)}")
        out[path] = named[path]
    return out


class FeatureCapture:
    """Record the outputs of named modules during forward passes.

    A context manager: hooks are registered on ``__enter__`` and always removed on ``__exit__``.
    After each forward, ``capture[path]`` is what the module at ``path`` returned (the last call
    wins if a module runs more than once). Outputs keep their autograd graph unless ``detach``.

    Args:
        model: any ``nn.Module``.
        paths: module paths as in ``model.named_modules()`` (e.g. ``"backbone.conv2"``).
        detach: store detached outputs (analysis; saves memory).
        clone: store a copy (the default), so a later in-place op (``ReLU(inplace=True)`` right
            after a hooked ``Linear``/``Conv2d``) cannot overwrite the recorded values; the copy
            keeps the autograd graph. ``False`` saves the copy where no in-place op follows
            (hooking whole blocks).

    Raises:
        ConfigError: a path names no module; the message lists existing paths.
    """

    def __init__(self, model: nn.Module, paths: Iterable[str], detach: bool = False,
                 clone: bool = True, key: str = "layers") -> None:
        self.paths = list(dict.fromkeys(paths))
        self.modules = resolve_modules(model, self.paths, key)
        self.detach, self.clone = detach, clone
        self.features: dict[str, Any] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, path: str):
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                if self.detach:
                    output = output.detach()
                if self.clone:
                    output = output.clone()
            self.features[path] = output
        return record

    def __enter__(self) -> FeatureCapture:
        self.features = {}
        self._handles = [m.register_forward_hook(self._hook(p)) for p, m in self.modules.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __getitem__(self, path: str) -> Any:
        if path not in self.features:
            raise KeyError(f"{path!r} produced no output in the last forward (is it on the "
                           f"forward path?); captured: {list(self.features)}")
        return self.features[path]

    def __contains__(self, path: str) -> bool:
        return path in self.features

    def clear(self) -> None:
        self.features = {}


@torch.no_grad()
def capture_features(model: nn.Module, x: torch.Tensor, paths: Iterable[str]) -> dict[str, Any]:
    """One no-grad forward of ``x``; returns ``{path: output}`` for the named modules."""
    with FeatureCapture(model, paths, detach=True) as cap:
        model(x)
    return {p: cap[p] for p in cap.paths}
