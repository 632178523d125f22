"""Checks that turn bad input into one clear line (``ConfigError``) before anything trains.

* ``check_leaf`` / ``validate_config``: every ``_target_`` leaf of a composed config against its
  constructor's signature — unknown keys, values of the wrong type, unresolved ``???`` — plus
  the run's own scalar keys (seed, epochs; learning rates finite and > 0), no NaN anywhere, model
  sizes ≥ 1. Data options are range-checked by the data modules' constructors (data/checks.py).
* ``check_state``: a state dict from outside (a knowledge package, a checkpoint) against a
  reference model's — keys, shapes, dtypes. Configs from files are parsed and built by
  ``transfer_lab.model_spec`` (plain JSON, an allow-list of factories), never here.
* ``load_into``: a strict, shape-checked ``load_state_dict`` that fails with one line.
* ``preflight_build``: a strategy's ``build`` on freshly initialised models, so a glob matching
  nothing, a strict-copy shape mismatch or an incompatible source/target fails before the source
  stage trains for hours.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.model_spec import describe as _describe  # one wording of a type hint

#: keys the run injects into leaves (not in the YAML, but accepted by the constructors)
INJECTED = {"data": {"seed", "key", "channels", "image_size"},
            "model": {"in_channels", "image_size", "num_classes"}}


# --- config leaves against their constructors ---------------------------------------------------
def _resolve_target(target: str, key: str) -> Callable:
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception as e:  # noqa: BLE001 — import errors of any kind become one line
        raise ConfigError(f"{key}._target_={target!r}: cannot be imported "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _parameters(fn: Callable) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Named parameters and type hints of ``fn`` (a class: its ``__init__`` up the MRO while
    each level forwards ``**kwargs``); the flag says whether unknown keys are accepted anyway."""
    chain = [c.__init__ for c in fn.__mro__ if "__init__" in vars(c)] if inspect.isclass(fn) else [fn]
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for f in chain:
        try:
            sig = inspect.signature(f)
        except (TypeError, ValueError):
            return params, hints, True
        try:
            hints = {**typing.get_type_hints(f), **hints}
        except Exception:  # noqa: BLE001 — unresolvable annotations: skip type checks, keep names
            pass
        var_kw = False
        for name, p in sig.parameters.items():
            if name == "self" or p.kind is p.VAR_POSITIONAL:
                continue
            if p.kind is p.VAR_KEYWORD:
                var_kw = True
                continue
            params.setdefault(name, p)
        if not var_kw:  # this level takes no **kwargs: the parameter set is closed
            return params, hints, False
    return params, hints, True


def _matches(value: Any, hint: Any) -> bool | None:
    """Does ``value`` (a plain container value) fit ``hint``? None: cannot tell, do not judge."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [_matches(value, a) for a in typing.get_args(hint)]
        return True if any(v is True for v in verdicts) else (None if None in verdicts else False)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (list, tuple, Sequence, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) == 1:
            inner = [_matches(v, args[0]) for v in value]
            return False if False in inner else (None if None in inner else True)
        return True
    if base in (dict, Mapping):
        return isinstance(value, dict)
    return None


def check_leaf(node: Mapping[str, Any], key: str, injected: set[str] = frozenset()) -> None:
    """One ``_target_`` node (plain dict) against its constructor's signature."""
    target = node.get("_target_")
    if not isinstance(target, str):
        raise ConfigError(f"{key}._target_: missing or not a string ({target!r})")
    params, hints, open_kw = _parameters(_resolve_target(target, key))
    for name, value in node.items():
        if name.startswith("_") and name.endswith("_"):
            continue
        if value == "???":
            raise ConfigError(f"{key}.{name}: missing value (???); set it on the command line, "
                              f"e.g. {key}.{name}=...")
        if name not in params:
            if open_kw:
                continue
            valid = sorted(set(params) - injected)
            raise ConfigError(f"{key}.{name}: unknown option for {target}; valid: {', '.join(valid)}")
        if _matches(value, hints.get(name, inspect.Parameter.empty)) is False:
            raise ConfigError(f"{key}.{name}={value!r}: expected {_describe(hints[name])}")
    required = [n for n, p in params.items() if p.default is p.empty
                and n not in node and n not in injected]
    if required:
        raise ConfigError(f"{key}: {target} needs {', '.join(required)} (missing key)")


def _scalar(cfg: Mapping[str, Any], path: str, kind: type, minimum: float | None = None) -> None:
    node: Any = cfg
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return
        node = node[part]
    ok = isinstance(node, kind) and not isinstance(node, bool) if kind is not float else (
        isinstance(node, (int, float)) and not isinstance(node, bool))
    if not ok:
        raise ConfigError(f"{path}={node!r}: expected {kind.__name__}")
    if minimum is not None and node < minimum:
        raise ConfigError(f"{path}={node!r}: must be ≥ {minimum}")


def _learning_rate(cfg: Mapping[str, Any], stage: str) -> None:
    """A finite lr > 0 (``lr=nan`` slips past ``< 0``; inf and 0 train nothing useful)."""
    optimizer = (cfg.get(stage) or {}).get("optimizer")
    if not isinstance(optimizer, Mapping) or "lr" not in optimizer:
        return
    lr = optimizer["lr"]
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"{stage}.optimizer.lr={lr!r}: must be a finite number > 0, e.g. "
                          f"{stage}.optimizer.lr=0.001")


def _finite(node: Any, path: str) -> None:
    """No NaN anywhere: it compares false with every bound, so it would pass each range check."""
    if isinstance(node, Mapping):
        for k, v in node.items():
            _finite(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            _finite(v, f"{path}[{i}]")
    elif isinstance(node, float) and math.isnan(node):
        raise ConfigError(f"{path}=nan: not a number; set a finite value")


def _counts(hint: Any) -> bool:
    """Is ``hint`` an ``int`` or a sequence of ints (optionally ``| None``): a count of things?"""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_counts(a) for a in typing.get_args(hint) if a is not type(None))
    if hint is int:
        return True
    base = typing.get_origin(hint) or hint
    args = [a for a in typing.get_args(hint) if a is not Ellipsis]
    return base in (list, tuple, Sequence, typing.Sequence) and args == [int]


def _model_sizes(node: Mapping[str, Any], key: str) -> None:
    """The options a model factory annotates as counts (``channels``, ``hidden``, ``width``,
    ``depth``: ``int`` or a sequence of ints) must be ≥ 1. Others may be 0 (``dropout=0``,
    ``mean=[0,0,0]``), and so may an ``int`` option whose default is 0 (0 is then meaningful)."""
    params, hints, _ = _parameters(_resolve_target(node["_target_"], key))
    for name, value in node.items():
        if name not in params or not _counts(hints.get(name)) or params[name].default == 0:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        bad = [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v < 1]
        if bad:
            raise ConfigError(f"{key}.{name}={value!r}: sizes must be integers ≥ 1")


def validate_config(cfg: Any) -> None:
    """Check a composed run config (``DictConfig`` or dict) without instantiating anything."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(cfg, DictConfig):
        try:
            plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as e:
            raise ConfigError(f"{e.full_key}: missing value (???); set it on the command line, "
                              f"e.g. {e.full_key}=...") from None
    else:
        plain = cfg
    _finite(plain, "")
    _scalar(plain, "seed", int)
    for stage in ("source", "target"):
        _scalar(plain, f"{stage}.epochs", int, 0)  # target.epochs=0: evaluate the transferred model as is
        _scalar(plain, f"{stage}.optimizer.lr", float)
        for kind in ("data", "model", "optimizer"):
            node = plain.get(stage, {}).get(kind)
            if isinstance(node, Mapping) and "_target_" in node:
                check_leaf(node, f"{stage}.{kind}", INJECTED.get(kind, set()) | (
                    {"params"} if kind == "optimizer" else set()))
                if kind == "model":
                    _model_sizes(node, f"{stage}.model")
        _learning_rate(plain, stage)
    if isinstance(plain.get("strategy"), Mapping):
        check_leaf(plain["strategy"], "strategy")
    trainer = plain.get("trainer")
    if isinstance(trainer, Mapping) and "_target_" in trainer:
        # the run passes these three itself; a stage's ``trainer`` overrides are Trainer kwargs too
        injected = {"logger", "callbacks", "default_root_dir"}
        check_leaf(trainer, "trainer", injected)
        for stage in ("source", "target"):
            extra = (plain.get(stage) or {}).get("trainer") or {}
            if isinstance(extra, Mapping) and extra:
                check_leaf({"_target_": trainer["_target_"], **extra}, f"{stage}.trainer", injected)


# --- state dicts from outside --------------------------------------------------------------------
def check_state(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                where: str, *, dtypes: bool = True) -> None:
    """Same keys, shapes and (optionally) dtypes as ``reference``, or one line naming the first fault."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        raise ConfigError(f"{where}: tensors do not match the model (missing {missing[:3]}"
                          f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                          f"{'...' if len(unexpected) > 3 else ''})")
    for k, ref in reference.items():
        got = state[k]
        if not isinstance(got, torch.Tensor):
            raise ConfigError(f"{where}: {k} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(ref.shape):
            raise ConfigError(f"{where}: {k} has shape {tuple(got.shape)}, the model expects "
                              f"{tuple(ref.shape)}")
        if dtypes and got.dtype != ref.dtype:
            raise ConfigError(f"{where}: {k} has dtype {got.dtype}, the model expects {ref.dtype}")
        if got.is_floating_point() and got.numel() and not torch.isfinite(got).all():
            raise ConfigError(f"{where}: {k} holds non-finite values")


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> nn.Module:
    """``model.load_state_dict(state)`` after ``check_state`` (dtypes may differ: they are cast)."""
    check_state(state, model.state_dict(), where, dtypes=False)
    model.load_state_dict(dict(state))
    return model


# --- strategies against the models they will meet -------------------------------------------------
def preflight_build(strategy: Any, source: nn.Module | None, target: nn.Module) -> None:
    """Run a copy of ``strategy.build`` on freshly initialised models (output silenced).

    Layer globs, block counts, strict copies and architecture compatibility are checked by the
    build itself, so this is the real check, just early: before the source stage trains.
    Non-config exceptions from a failing build are turned into one ``ConfigError`` line.
    """
    trial = copy.deepcopy(strategy)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            trial.build(copy.deepcopy(source) if source is not None else None, copy.deepcopy(target))
    except ConfigError:
        raise
    except (RuntimeError, ValueError, KeyError, AttributeError, IndexError, TypeError) as e:
        msg = str(e).strip().splitlines()[-1].strip() if str(e).strip() else ""
        raise ConfigError(f"strategy={getattr(strategy, 'name', type(strategy).__name__)}: cannot "
                          f"build the target from this source ({type(e).__name__}: {msg})") from None
