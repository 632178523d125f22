"""Configs that come from a file (knowledge packages, store entries) are data, never code.

A config read from disk is parsed with plain ``json`` — no OmegaConf, so no resolver or
interpolation ever runs (``${oc.create:…}`` once built an ``open`` call through
``hydra.utils.instantiate``): any string holding ``${`` is refused outright. Its model is built
only by calling one of this project's model factories (``MODEL_FACTORIES``) directly, with the
keys and value types of the factory's signature, never through ``instantiate``.
``build_model_from_spec`` is the one way to build a model from such a config.
"""

from __future__ import annotations

import fnmatch
import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from transfer_lab.errors import ConfigError

#: the model factories a config from a file may name (fnmatch patterns over the full name). To
#: allow a new builder, add it here; timm and torchvision builders will be named like these.
MODEL_FACTORIES: tuple[str, ...] = (
    "transfer_lab.models.mlp", "transfer_lab.models.lenet", "transfer_lab.models.convnet",
    "transfer_lab.models.resnet_cifar", "transfer_lab.models.torchvision_model",
    "transfer_lab.models.timm*", "transfer_lab.models.torchvision*",
)
#: ``_target_``s allowed *outside* ``model`` (records of the data, optimizer and trainer a source
#: was trained with): kept as strings for provenance, never instantiated from a file
RECORD_TARGETS: tuple[str, ...] = ("transfer_lab.*", "torch.optim.*", "lightning.*")
#: wired from the config's ``input_shape`` / ``num_classes``, never set in its ``model`` node
WIRED = ("in_channels", "image_size", "num_classes")
#: factory options that fetch or read other files: a file's config never sets them (the weights
#: are the package's own tensors), so they are built as None
EXTERNAL = ("weights", "checkpoint")
#: no layer of these models is wider or deeper, no sequence longer: a bigger number in a file is a
#: typo or an attack (resnet_cifar(depth=2**31 - 2) would loop for hours before any size check)
MAX_INT, MAX_LEN, MAX_CLASSES = 4096, 64, 100_000
#: the largest model a file may describe (parameters and buffers, float32)
MAX_MODEL_BYTES = 8 << 30


def parse_config(blob: bytes, where: str, *, strict: bool = True) -> dict[str, Any]:
    """``config.json`` bytes → dict, with plain ``json``: duplicate keys, NaN/Infinity, nesting
    too deep for the parser and any ``${`` are refused, and (``strict``) a ``_target_`` outside
    ``model`` must be a ``RECORD_TARGETS`` name. Store entries are read with ``strict=False``:
    their records hold the user's own optimizer or data classes, and are never built."""
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):  # json keeps the last silently: which one did the author mean?
            seen: set[str] = set()
            dup = next(k for k, _ in pairs if k in seen or seen.add(k))
            raise ConfigError(f"{where}: config.json repeats key {dup!r}")
        return obj

    def no_constant(name: str) -> Any:
        raise ConfigError(f"{where}: config.json holds {name}, which is not JSON")

    try:
        config = json.loads(blob, object_pairs_hook=no_duplicates, parse_constant=no_constant)
        if not isinstance(config, dict):
            raise ConfigError(f"{where}: config.json must be a JSON object, not {type(config).__name__}")
        _check_tree(config, "config", where, strict)
    except ConfigError:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ConfigError(f"{where}: config.json is not valid JSON or nests too deep "
                          f"({type(e).__name__})") from None
    return config


def _check_tree(obj: Any, path: str, where: str, strict: bool) -> None:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        sub = f"{path}.{k}" if isinstance(obj, dict) else f"{path}[{k}]"
        for s in (k, v):
            if isinstance(s, str) and "${" in s:
                raise ConfigError(f"{where}: {sub} holds an interpolation ({s[:60]!r}); a config "
                                  "from a file is data: no ${...} is ever resolved")
        if strict and k == "_target_" and not _in_model(path):
            if not (isinstance(v, str) and _dotted(v) and _listed(v, RECORD_TARGETS)):
                raise ConfigError(f"{where}: {sub}={v!r} is not a record of this project's "
                                  f"data/optimizer/trainer ({', '.join(RECORD_TARGETS)})")
        _check_tree(v, sub, where, strict)


def _in_model(path: str) -> bool:
    # the model node is checked against its factory's signature when (and only when) it is built
    return path == "config.model" or path.startswith(("config.model.", "config.model["))


def _dotted(name: str) -> bool:
    return all(part.isidentifier() and not part.startswith("_") for part in name.split("."))


def _listed(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def model_factory(target: Any, where: str) -> Callable[..., nn.Module]:
    """The allow-listed factory ``target`` names: a function of ``transfer_lab.models``."""
    import transfer_lab.models as models

    prefix = "transfer_lab.models."
    attr = target[len(prefix):] if isinstance(target, str) and target.startswith(prefix) else ""
    fn = getattr(models, attr, None) if attr.isidentifier() and not attr.startswith("_") else None
    if (not _listed(str(target), MODEL_FACTORIES) or not inspect.isfunction(fn)
            or not fn.__module__.startswith("transfer_lab.models")):
        raise ConfigError(f"{where}: model._target_={target!r} is not an allowed model factory "
                          f"(allowed: {', '.join(MODEL_FACTORIES)}); refused")
    return fn


def _fits(value: Any, hint: Any) -> bool:
    """Does a JSON value fit a type hint? Strict: a hint this cannot judge is not settable."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return type(value) is int and -MAX_INT <= value <= MAX_INT
    if hint is float:
        return type(value) in (int, float) and math.isfinite(value) and abs(value) <= MAX_INT
    if hint is str:
        return isinstance(value, str) and len(value) <= 256
    if (origin or hint) in (list, tuple, Sequence):
        inner = [a for a in args if a is not Ellipsis]
        return (isinstance(value, list) and len(value) <= MAX_LEN and len(set(inner)) == 1
                and all(_fits(v, inner[0]) for v in value))
    return False


def describe(hint: Any) -> str:
    """A type hint in words for one-line errors (``int or null``, ``Sequence[int]``)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    name = getattr(hint, "__name__", None) if typing.get_origin(hint) is None else None
    return name or str(hint).replace("typing.", "").replace("collections.abc.", "")


def _shape(config: Mapping[str, Any], where: str) -> tuple[tuple[int, int, int], int]:
    shape, n = config.get("input_shape"), config.get("num_classes")
    if not (isinstance(shape, list) and len(shape) == 3
            and all(type(s) is int and 0 < s <= MAX_INT for s in shape)):
        raise ConfigError(f"{where}: input_shape={shape!r}: expected [C, H, W], positive "
                          f"integers ≤ {MAX_INT}")
    if not (type(n) is int and 0 < n <= MAX_CLASSES):
        raise ConfigError(f"{where}: num_classes={n!r}: expected an integer in 1..{MAX_CLASSES}")
    return (shape[0], shape[1], shape[2]), n


def model_spec(config: Mapping[str, Any], where: str) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """The factory and keyword arguments a file's config describes, checked against the
    factory's signature: known keys only, values of the annotated types, nothing nested."""
    node = config.get("model")
    if not isinstance(node, dict):
        raise ConfigError(f"{where}: config.json has no model object")
    fn = model_factory(node.get("_target_"), where)
    params = {n: p for n, p in inspect.signature(fn).parameters.items()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    hints = typing.get_type_hints(fn)
    kwargs: dict[str, Any] = {}
    for key, value in node.items():
        if key == "_target_":
            continue
        if isinstance(value, dict) and "_target_" in value:
            raise ConfigError(f"{where}: model.{key} is a nested _target_; refused (a file builds no "
                              "object but the model)")
        if key.startswith("_") or key in WIRED or key not in params:
            valid = sorted(set(params) - set(WIRED))
            raise ConfigError(f"{where}: model.{key}: not an option of {node['_target_']} "
                              f"(valid: {', '.join(valid)})")
        if value is not None and key in EXTERNAL:
            value = None  # the package's tensors are the weights; nothing is fetched or read
        if not _fits(value, hints.get(key)):
            raise ConfigError(f"{where}: model.{key}={_short(value)}: expected "
                              f"{describe(hints.get(key))} (numbers within ±{MAX_INT}, "
                              f"at most {MAX_LEN} items)")
        kwargs[key] = value
    (c, _, s), n = _shape(config, where)  # as the run wires it: image_size is the width
    missing = [k for k, p in params.items() if p.default is p.empty and k not in (*WIRED, *kwargs)]
    if missing:
        raise ConfigError(f"{where}: model needs {', '.join(missing)} (missing in config.json)")
    return fn, {**kwargs, "in_channels": c, "image_size": s, "num_classes": n}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _call(fn: Callable[..., nn.Module], kwargs: dict[str, Any], where: str) -> nn.Module:
    try:
        model = fn(**kwargs)
    except Exception as e:  # noqa: BLE001 — an allow-listed factory refusing its arguments
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(f"{where}: {fn.__name__}({_short({k: kwargs[k] for k in sorted(kwargs)})}) "
                          f"builds no model ({type(e).__name__}: {msg})") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{where}: {fn.__name__} returned a {type(model).__name__}, not a model")
    return model


def build_model_from_spec(config: Mapping[str, Any], where: str,
                          device: str | torch.device | None = None) -> nn.Module:
    """The model a config from a file describes, built by its allow-listed factory.

    The one way any code builds a model from a file's config. It is first built on the meta
    device (shapes only, no memory) to refuse a model larger than ``MAX_MODEL_BYTES``; with
    ``device="meta"`` that reference is returned (for checking tensors against it).
    """
    fn, kwargs = model_spec(config, where)
    with torch.device("meta"):
        reference = _call(fn, kwargs, where)
    size = 4 * sum(t.numel() for t in reference.state_dict().values())
    if size > MAX_MODEL_BYTES:
        raise ConfigError(f"{where}: the model described needs {size / 2**30:.1f} GiB, more than "
                          f"{MAX_MODEL_BYTES / 2**30:.0f} GiB; refused")
    if device is not None and torch.device(device).type == "meta":
        return reference
    if device is None:
        return _call(fn, kwargs, where)
    with torch.device(device):
        return _call(fn, kwargs, where)
