"""Builders: the leaves of a run (data module, model, TransferModule, Trainer, loggers) from config.

Every leaf is instantiated by Hydra from its ``_target_``; this file only injects what the run
knows (seed, input shape, number of classes, output directory) and turns a constructor's
failure into one ``ConfigError`` line instead of Hydra's multi-line ``InstantiationException``.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.module import TransferModule
from transfer_lab.perf import skip_nvml_check_without_driver
from transfer_lab.strategies.base import Strategy

log = logging.getLogger("transfer_lab")


def build(node: Any, where: str, /, **kwargs: Any) -> Any:
    """``instantiate(node, **kwargs)``; a ConfigError raised inside a constructor comes out as
    itself (Hydra wraps it), any other constructor failure as one line naming ``where``."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        inner = e.__cause__ or e
        first = (str(inner).strip().splitlines() or [""])[0]
        target = node.get("_target_") if isinstance(node, (dict, DictConfig)) else None
        raise ConfigError(f"{where}: {target} cannot be built from this config "
                          f"({type(inner).__name__}: {first})") from None


def task_of(dm: TransferDataModule) -> str:
    """``classification`` unless the data module declares another task (``TableData``: regression)."""
    return getattr(dm, "task", "classification")


CONSTANT = "transfer_lab.schedulers.constant"
SCHEDULES = ("constant", "cosine", "onecycle")  # conf/scheduler/


def scheduler_of(cfg: DictConfig, stage: str) -> Any:
    """A stage's schedule as it enters a store key: ``"none"`` for ``constant`` (or unset), so
    keys of entries stored before schedules were a config group stay valid; else its config."""
    node = schedule_node(cfg, stage)
    if node is None or node.get("_target_") == CONSTANT:
        return "none"
    return OmegaConf.to_container(node, resolve=True)


def schedule_node(cfg: DictConfig, stage: str) -> DictConfig | None:
    """The ``scheduler@<stage>.scheduler`` node; the string form of earlier versions is one line."""
    node = cfg[stage].get("scheduler")
    if node is not None and not isinstance(node, DictConfig):
        raise ConfigError(f"{stage}.scheduler={node}: a schedule is a config group now: use "
                          f"scheduler@{stage}.scheduler={node if node in SCHEDULES else 'cosine'} "
                          f"({'|'.join(SCHEDULES)}, conf/scheduler/)")
    return node


def schedule_factory(cfg: DictConfig, stage: str) -> Any:
    """The instantiated schedule factory of a stage (``transfer_lab.schedulers``), None when unset."""
    node = schedule_node(cfg, stage)
    if node is None:
        return None
    factory = build(node, f"{stage}.scheduler")
    if not callable(factory):
        raise ConfigError(f"{stage}.scheduler._target_={node.get('_target_')}: not a schedule factory "
                          "(needs _partial_: true, see conf/scheduler/)")
    return factory


def make_datamodule(data_cfg: DictConfig, seed: int, key: str,
                    default_shape: tuple[int, int, int] | None = None,
                    model_cfg: DictConfig | None = None) -> TransferDataModule:
    """Instantiate a data config. Unset channels/size default to ``default_shape`` (the source's),
    else to what the side's model declares (``model_data_overrides``: also its mean/std)."""
    extra: dict[str, Any] = {"seed": int(seed), "key": key}
    if default_shape is not None:
        if data_cfg.get("channels") is None:
            extra["channels"] = default_shape[0]
        if data_cfg.get("image_size") is None:
            extra["image_size"] = default_shape[-1]
    extra = {**model_data_overrides(data_cfg, model_cfg, extra.get("channels")), **extra}
    dm = build(data_cfg, key, **extra)
    if not isinstance(dm, TransferDataModule):
        raise ConfigError(f"{key}._target_={data_cfg.get('_target_')}: not a TransferDataModule")
    return dm


def model_data_overrides(data_cfg: DictConfig, model_cfg: DictConfig | None,
                         channels: int | None = None) -> dict[str, Any]:
    """The data settings a side's model declares (``model_data_config``: a pretrained model's
    mean/std, input size and channels), each only where the data config leaves it unset: an
    explicit ``image_size`` wins (CPU-sized runs of 224-pixel models). Our own nets declare none.
    ``channels``: the side's channel count when known otherwise (the source's, for a target)."""
    from transfer_lab.models.weights import model_data_config

    channels = data_cfg.get("channels") or channels
    declared = model_data_config(model_cfg, in_channels=channels) if model_cfg is not None else None
    if declared is None:
        return {}
    out: dict[str, Any] = {}
    if data_cfg.get("mean") is None and data_cfg.get("std") is None:
        out.update(mean=list(declared["mean"]), std=list(declared["std"]))
    if data_cfg.get("image_size") is None and declared.get("input_size"):
        out["image_size"] = int(declared["input_size"][-1])
    if channels is None:
        out["channels"] = len(declared["mean"])
    return out


def without_weights(model_cfg: DictConfig) -> DictConfig:
    """The model config with its weights source unset (``weights``/``checkpoint`` → None): for a
    model whose every weight comes from elsewhere — a stored or packaged source, whose state dict
    replaces everything, and a target inheriting the source's config (``scratch`` starts random)."""
    out = copy.deepcopy(model_cfg)
    for k in ("weights", "checkpoint"):
        if out.get(k) is not None:
            out[k] = None
    return out


def build_model(model_cfg: DictConfig, dm: TransferDataModule | None = None, *,
                input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                key: str = "model") -> Classifier:
    """A model for ``dm``'s input shape and classes (or the ones given)."""
    c, _, s = input_shape or dm.input_shape
    return build(model_cfg, key, in_channels=c, image_size=s, num_classes=num_classes or dm.num_classes)


def rng_state() -> dict[str, Any]:
    """The global RNG states a model build consumes (python, numpy, torch CPU)."""
    import random

    import numpy as np

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Put back a ``rng_state()`` snapshot: what follows draws as if nothing ran in between."""
    import random

    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def make_strategy(cfg: DictConfig) -> Strategy:
    strategy = build(cfg.strategy, "strategy")
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy._target_={cfg.strategy._target_}: not a transfer_lab Strategy")
    return strategy


def make_module(cfg: DictConfig, stage: str, model: torch.nn.Module, strategy: Strategy,
                dm: TransferDataModule, class_weights: torch.Tensor | None = None) -> TransferModule:
    """The ``TransferModule`` of one stage: its optimizer, schedule and the data's task."""
    opt = cfg[stage].optimizer
    return TransferModule(model, strategy, instantiate(opt, _partial_=True), lr=float(opt.lr),
                          num_classes=dm.num_classes, class_weights=class_weights,
                          scheduler=schedule_factory(cfg, stage), task=task_of(dm),
                          target_norm=getattr(dm, "target_norm", None))


def make_trainer(cfg: DictConfig, stage: str, out_dir: Path, callbacks: list,
                 devices: Any = None) -> L.Trainer:
    """The shared ``trainer`` config plus the stage's own ``epochs`` and ``trainer`` overrides."""
    skip_nvml_check_without_driver()
    kwargs = dict(OmegaConf.to_container(cfg.trainer, resolve=True))
    if devices is not None:
        kwargs["devices"] = devices
    if stage == "source":  # one device, one process: see source_stage
        d = kwargs.get("devices")
        kwargs.update(devices=d if isinstance(d, list) and len(d) == 1 else 1, num_nodes=1,
                      strategy="auto" if "ddp" in str(kwargs.get("strategy")) else kwargs.get("strategy"))
    kwargs.update(OmegaConf.to_container(cfg[stage].trainer, resolve=True) or {})
    if kwargs.get("enable_progress_bar") is None:
        kwargs["enable_progress_bar"] = sys.stderr.isatty() and not os.environ.get("CI")
    kwargs.update({k: v for k, v in length_of(cfg, stage).items() if k not in kwargs})
    every = kwargs.get("val_check_interval")
    if isinstance(every, int) and not isinstance(every, bool):
        # an int counts steps across epochs: with an epoch cadence Lightning refuses one larger
        # than the batches per epoch (a 50-image target has one batch per epoch)
        kwargs["check_val_every_n_epoch"] = None
    # the callbacks group (e.g. performance options) runs beside the strategy's own
    configured = make_callbacks(cfg) + [build(c, "trainer.callbacks") for c in kwargs.pop("callbacks", None) or []]
    if any(isinstance(c, ModelCheckpoint) for c in callbacks):
        kwargs["enable_checkpointing"] = True
    return build(kwargs, "trainer", logger=make_loggers(cfg, out_dir, stage),
                 callbacks=[*configured, *callbacks], default_root_dir=str(out_dir))


def length_of(cfg: DictConfig, stage: str) -> dict[str, Any]:
    """Trainer arguments for a stage's length: ``steps`` (total optimizer steps, when set)
    replaces ``epochs``; ``val_check_interval`` validates every N steps instead of every epoch."""
    steps = cfg[stage].get("steps")
    out: dict[str, Any] = ({"max_steps": int(steps), "max_epochs": -1} if steps is not None
                           else {"max_epochs": int(cfg[stage].epochs)})
    every = cfg[stage].get("val_check_interval")
    if every is not None:
        out["val_check_interval"] = every
    return out


def make_loggers(cfg: DictConfig, out_dir: Path, stage: str) -> list | bool:
    """The ``logger`` group's loggers (``conf/logger/``), each writing under ``<out_dir>/<stage>``."""
    node = cfg.get("logger")
    if node is None:
        return False
    if not isinstance(node, DictConfig) or any(not isinstance(v, DictConfig) for v in node.values()):
        raise ConfigError(f"logger={OmegaConf.to_container(node) if isinstance(node, DictConfig) else node}: "
                          "choose options of conf/logger/ (csv, tensorboard, none; several: "
                          "logger=[csv,tensorboard])")
    loggers = [build(v, f"logger.{k}", save_dir=str(out_dir), name=stage) for k, v in node.items()]
    return loggers or False


def make_callbacks(cfg: DictConfig) -> list:
    """The ``callbacks`` group's Lightning callbacks (``conf/callbacks/``), for every stage."""
    node = cfg.get("callbacks") or {}
    return [build(v, f"callbacks.{k}") for k, v in node.items() if v is not None]


def resume_callbacks(cfg: DictConfig, ckpt_dir: Path) -> list:
    """The last epoch's state, so a killed cell resumes rather than restarts (``resume=true``)."""
    if not cfg.get("resume", True):
        return []
    return [ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                            enable_version_counter=False)]


def last_checkpoint(ckpt_dir: Path) -> tuple[Path, int] | None:
    """``(path, epoch)`` to resume from: the newer (by optimizer step) of a readable ``last.ckpt``
    and the ``hpc_ckpt_<n>.ckpt`` a SLURM requeue (USR1) saved beside ``ckpt_dir``; unreadable
    ones (killed mid-write) are dropped."""
    found = [f for f in (readable_checkpoint(ckpt_dir), *map(_readable, _hpc_checkpoints(ckpt_dir.parent)))
             if f is not None]
    if not found:
        return None
    path, epoch, _ = max(found, key=lambda f: f[2])
    log.info("resuming %s from %s after epoch %d", ckpt_dir.parent, path.name, epoch)
    return path, epoch


def readable_checkpoint(ckpt_dir: Path) -> tuple[Path, int, int] | None:
    """``(last.ckpt, epoch, global step)`` if it can be read; a damaged one is removed (rank 0)."""
    return _readable(ckpt_dir / "last.ckpt")


def _readable(path: Path) -> tuple[Path, int, int] | None:
    if not path.is_file():
        return None
    try:  # tensors + primitives: weights_only refuses anything that would run code on unpickling
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return path, int(state["epoch"]), int(state["global_step"])
    except Exception as e:  # noqa: BLE001 — any damage means: start this cell over
        log.warning("removing unreadable checkpoint %s (%s)", path, e)
        if rank_zero_only.rank == 0:
            path.unlink(missing_ok=True)
        return None


def _hpc_checkpoints(out_dir: Path) -> list[Path]:
    """What Lightning's SLURM requeue saves in the trainer's root directory (the cell's)."""
    return sorted(out_dir.glob("hpc_ckpt_*.ckpt"))


def remove_resume_state(out_dir: Path) -> None:
    """After a cell finished: its ``checkpoints/`` (last, best) and any ``hpc_ckpt_*.ckpt``."""
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    for path in _hpc_checkpoints(out_dir):
        path.unlink(missing_ok=True)
