"""Local weight files into library models (timm, torchvision), checked strictly, and the data
statistics a model declares for its inputs.

Files come from outside, so they are read through ``transfer_lab.io.read_weights`` (tensors only,
nothing in them runs) and must match the model key for key and shape for shape: a file for another
architecture or variant fails before training with one line naming the file and the first bad key.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from transfer_lab.errors import ConfigError

#: suffixes read as a local weights file (anything else given as ``weights`` is a library name)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def is_weights_file(value: str | None) -> bool:
    return value is not None and (Path(value).suffix in WEIGHT_SUFFIXES or "/" in value)


def check_state(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                where: str, model: str) -> None:
    """Keys and shapes equal; else one ``ConfigError`` line naming ``where`` and the first bad key."""
    for k, v in expected.items():
        if k not in state:
            raise ConfigError(f"{where}: missing {k} (the file holds {len(state)} tensors; is it "
                              f"a state dict of {model}?)")
        if tuple(state[k].shape) != tuple(v.shape):
            raise ConfigError(f"{where}: {k} has shape {tuple(state[k].shape)}, {model} expects "
                              f"{tuple(v.shape)} (weights of another variant?)")
    extra = [k for k in state if k not in expected]
    if extra:
        raise ConfigError(f"{where}: unexpected {extra[0]} ({len(extra)} tensor(s) {model} does "
                          "not have)")


def load_strict(net: nn.Module, state: Mapping[str, torch.Tensor], where: str, model: str,
                skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``check_state`` against ``net``, then load (tensors are copied into the model's dtype).

    ``skip``: module prefixes the file may or may not hold and that are not loaded into ``net``
    (the library model's own classifier, which a new head replaces: a file trained for 10
    classes loads too). Returns those skipped tensors (see ``load_head``).
    """
    prefixes = tuple(p + "." for p in skip)
    kept = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    expected = {k: v for k, v in net.state_dict().items() if not k.startswith(prefixes)}
    check_state(kept, expected, where, model)
    net.load_state_dict(kept, strict=not skip)
    return {k: v for k, v in state.items() if k.startswith(prefixes)}


def load_head(head: nn.Module, tensors: Mapping[str, torch.Tensor], prefix: str) -> bool:
    """Load a file's classifier ``<prefix>.weight/.bias`` into the head's last Linear when the
    shapes fit (the model is then the file's model as it is, e.g. a pretrained source scored by
    LEEP); otherwise the head stays new. Returns whether it was loaded."""
    linear = [m for m in head.modules() if isinstance(m, nn.Linear)][-1]
    got = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    want = linear.state_dict()
    if set(got) != set(want) or any(got[k].shape != want[k].shape for k in want):
        return False
    linear.load_state_dict(got)
    return True


def model_data_config(model: nn.Module | Mapping[str, Any], in_channels: int | None = None) -> dict | None:
    """The input statistics a model declares, or None (our own nets: the dataset's statistics).

    Takes a built model (its ``data_config`` attribute) or a model config (``_target_`` + keys):
    a factory declares its statistics by carrying a ``data_config`` function that takes the same
    keys, so the run can ask before it builds the data module. Returns
    ``{"mean": [...], "std": [...], "input_size": [C, H, W], "interpolation": str, "source": str}``;
    ``input_size`` is the size the weights were trained at, None where unknown (an explicit
    ``image_size`` wins).
    ``in_channels`` (config form only): the side's channel count, when the data fixes it (grey).
    """
    if isinstance(model, nn.Module):
        return getattr(model, "data_config", None)
    target = model.get("_target_")
    if not target:
        return None
    from hydra.utils import get_object

    declare = getattr(get_object(str(target)), "data_config", None)
    if declare is None:
        return None
    keys = {k: v for k, v in dict(model).items() if not str(k).startswith("_")}
    if in_channels is not None:
        keys["in_channels"] = in_channels
    return declare(**keys)


def stats_config(mean: Any, std: Any, input_size: Any, interpolation: str, source: str,
                 in_channels: int, key: str = "model") -> dict:
    """Normalisation statistics shaped for ``in_channels`` (grey input: the RGB values averaged,
    as the first layer's RGB filters are summed for it)."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    if len(mean) != len(std) or not all(s > 0 for s in std):
        raise ConfigError(f"{key}.mean/std: {mean} / {std}: one value each per channel, std > 0")
    if in_channels == 1 and len(mean) == 3:
        mean, std = [sum(mean) / 3], [sum(std) / 3]
    if len(mean) != in_channels:
        raise ConfigError(f"{key}.mean/std: {len(mean)} values for {in_channels}-channel input")
    size = None if input_size is None else [in_channels, *[int(s) for s in list(input_size)[-2:]]]
    return {"mean": mean, "std": std, "input_size": size, "interpolation": str(interpolation),
            "source": source}
