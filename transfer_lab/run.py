"""One run: source stage (cached in the store) → strategy → target stage → results.json.

The leaves (data, models, strategy, optimizer, trainer) are instantiated from config; this file
is the plain-code wiring between them.
"""

from __future__ import annotations

import logging
import os
import platform
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import transfer_lab
from transfer_lab.checkpoint import save_trainable
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError
from transfer_lab.io import atomic_save_safetensors, atomic_write_json
from transfer_lab.models.classifier import Classifier
from transfer_lab.module import TransferModule
from transfer_lab.results import config_hash
from transfer_lab.store import SourceStore, load_state_dict, store_key
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.scratch import Scratch
from transfer_lab.validate import load_into, preflight_build, validate_config

log = logging.getLogger("transfer_lab")
SAVE_MODES = ("auto", "trainable", "full", "none")
SCHEDULERS = ("none", "cosine")
LOGGERS = ("csv", "tensorboard", "none")
# Lightning's per-Trainer banners ("GPU available", tips) drown a sweep's one-line summaries
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
              "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=".*module\(s\) in eval mode at the start of training.*")


def run(cfg: DictConfig, out_dir: str | Path, choices: dict[str, Any] | None = None,
        devices: Any = None) -> dict:
    """Run one source → target transfer and write ``<out_dir>/results.json``. Returns the results.

    ``devices`` (e.g. ``[1]`` from a parallel sweep's placement) replaces ``trainer.devices``
    without entering the config, so it does not change the config hash that resuming compares.
    """
    out_dir = Path(out_dir)
    choices = dict(choices or {})
    started = time.perf_counter()
    strategy, source_dm, target_dm, tgt_model_cfg = prepare(cfg)
    results: dict[str, Any] = {
        "status": "running", "strategy": choices.get("strategy") or strategy.name,
        "seed": int(cfg.seed), "choices": choices, "config_hash": config_hash(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True), "env": environment()}

    t0 = time.perf_counter()
    source, results["source"] = source_stage(cfg, strategy, source_dm, devices)
    source_s = time.perf_counter() - t0

    if source is not None and cfg.get("transferability", True):
        results["transferability"] = transferability_scores(source, target_dm)
    L.seed_everything(int(cfg.seed), verbose=False)  # the target init is the same whatever the source path
    target = build_model(tgt_model_cfg, target_dm)
    model = strategy.build(source, target)
    module = TransferModule(model, strategy, instantiate(cfg.target.optimizer, _partial_=True),
                            lr=float(cfg.target.optimizer.lr), num_classes=target_dm.num_classes,
                            class_weights=target_dm.class_weights, scheduler=scheduler_of(cfg, "target"),
                            task=task_of(target_dm), target_norm=getattr(target_dm, "target_norm", None))
    results["data"] = {"target": {**target_dm.summary(),
                                  "samples_per_class": cfg.target.data.get("samples_per_class")}}
    results["params"] = {"total": sum(p.numel() for p in model.parameters()),
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    t0 = time.perf_counter()
    ckpt_dir = out_dir / "checkpoints"
    callbacks = strategy.callbacks()
    if cfg.get("resume", True):  # the last epoch's state, so a killed cell resumes rather than restarts
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                                         enable_version_counter=False))
    trainer = make_trainer(cfg, "target", out_dir, callbacks, devices)
    resume_from = last_checkpoint(ckpt_dir) if cfg.get("resume", True) else None
    try:
        trainer.fit(module, datamodule=strategy.datamodule(target_dm, source_dm),
                    ckpt_path=str(resume_from[0]) if resume_from else None)
        # the last epoch's train/val figures: trainer.test resets callback_metrics
        fitted = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        tested = trainer.test(module, datamodule=target_dm, verbose=False)[0]
    except Exception as e:
        results.update(status="failed", error=f"{type(e).__name__}: {e}")
        if trainer.is_global_zero:
            atomic_write_json(out_dir / "results.json", results)
        raise
    results["metrics"] = {**fitted, **{k: float(v) for k, v in tested.items()}}
    if module.test_per_class is not None:
        results["per_class"] = {"test/acc": module.test_per_class}
    results["strategy_report"] = strategy.report()
    results["target_training"] = {"epochs": int(trainer.current_epoch), "world_size": trainer.world_size,
                                  "resumed_after_epoch": resume_from[1] if resume_from else None}
    if trainer.is_global_zero:
        results["weights"] = save_weights(model, out_dir, cfg.target.save_weights,
                                          results["source"].get("key"))
    results["timings"] = {"source_s": round(source_s, 3), "target_s": round(time.perf_counter() - t0, 3),
                          "total_s": round(time.perf_counter() - started, 3)}
    results["status"] = "ok"
    if trainer.is_global_zero:
        atomic_write_json(out_dir / "results.json", results)
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the weights are saved; the resume state is not needed
    return results


def scheduler_of(cfg: DictConfig, stage: str) -> str:
    """A stage's learning-rate schedule (``none`` when the key is unset or null)."""
    return str(cfg[stage].get("scheduler") or "none")


def task_of(dm: TransferDataModule) -> str:
    """``classification`` unless the data module declares another task (``TableData``: regression)."""
    return getattr(dm, "task", "classification")


def transferability_scores(source: Classifier, dm: TransferDataModule, max_samples: int = 2000) -> dict:
    """LogME and LEEP of the frozen source on the target training set, before any training
    (You et al., 2021; Nguyen et al., 2020). Classification targets whose input the source takes."""
    from transfer_lab.analysis.transferability import transferability

    if task_of(dm) != "classification":
        return {"skipped": "regression target"}
    if tuple(source.input_shape) != tuple(dm.input_shape):  # scoring would need the source's data path
        return {"skipped": f"source input {list(source.input_shape)} ≠ target input {list(dm.input_shape)}"}
    return transferability(source, dm, max_samples=max_samples, seed=0)  # eval mode, no_grad: no BN drift


def last_checkpoint(ckpt_dir: Path) -> tuple[Path, int] | None:
    """``(path, epoch)`` of a readable ``last.ckpt``; an unreadable one (killed mid-write) is dropped."""
    path = ckpt_dir / "last.ckpt"
    if not path.is_file():
        return None
    try:  # tensors + primitives: weights_only refuses anything that would run code on unpickling
        epoch = int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception as e:  # noqa: BLE001 — any damage means: start this cell over
        log.warning("ignoring unreadable checkpoint %s (%s): training from the start", path, e)
        if rank_zero_only.rank == 0:
            path.unlink(missing_ok=True)
        return None
    log.info("resuming %s from its checkpoint after epoch %d", ckpt_dir.parent, epoch)
    return path, epoch


def prepare(cfg: DictConfig) -> tuple[Strategy, TransferDataModule | None, TransferDataModule, DictConfig]:
    """Instantiate and validate everything before any training: bad input fails here.

    Order: the config against the constructors (types, unknown keys, ``???``), then the data
    (classes, budgets, files), then the strategy's ``build`` on freshly initialised models (layer
    globs, strict copies, source/target compatibility) — so nothing trains before a mistake shows.
    """
    validate_config(cfg)
    for stage in ("source", "target"):
        if scheduler_of(cfg, stage) not in SCHEDULERS:
            raise ConfigError(f"{stage}.scheduler={cfg[stage].get('scheduler')!r}: valid: {', '.join(SCHEDULERS)}")
    if cfg.target.save_weights not in SAVE_MODES:
        raise ConfigError(f"target.save_weights={cfg.target.save_weights!r}: valid: {', '.join(SAVE_MODES)}")
    logger_names(cfg.get("logger", "csv"))
    strategy = instantiate(cfg.strategy)
    if not isinstance(strategy, Strategy):
        raise ConfigError(f"strategy._target_={cfg.strategy._target_}: not a transfer_lab Strategy")
    source_dm = None
    if strategy.needs_source:
        source_dm = make_datamodule(cfg.source.data, cfg.seed, "source.data").prepare()
    target_dm = make_datamodule(cfg.target.data, cfg.seed, "target.data",
                                default_shape=source_dm.input_shape if source_dm else None)
    target_dm.prepare()
    for key, dm in (("target.data", target_dm), ("source.data", source_dm)):
        if dm is not None and task_of(dm) not in strategy.tasks:
            raise ConfigError(f"strategy._target_={cfg.strategy._target_}: handles {', '.join(strategy.tasks)} "
                              f"tasks, but {key} is a {task_of(dm)} task (regression: scratch, finetune, "
                              "linear_probe, partial, l2sp)")
    tgt_model_cfg = cfg.target.get("model") or cfg.source.model
    source = build_model(cfg.source.model, source_dm) if source_dm is not None else None
    preflight_build(strategy, source, build_model(tgt_model_cfg, target_dm))
    return strategy, source_dm, target_dm, tgt_model_cfg


def make_datamodule(data_cfg: DictConfig, seed: int, key: str,
                    default_shape: tuple[int, int, int] | None = None) -> TransferDataModule:
    """Instantiate a data config; unset channels/size default to ``default_shape`` (the source's)."""
    extra: dict[str, Any] = {"seed": int(seed), "key": key}
    if default_shape is not None:
        if data_cfg.get("channels") is None:
            extra["channels"] = default_shape[0]
        if data_cfg.get("image_size") is None:
            extra["image_size"] = default_shape[-1]
    dm = instantiate(data_cfg, **extra)
    if not isinstance(dm, TransferDataModule):
        raise ConfigError(f"{key}._target_={data_cfg.get('_target_')}: not a TransferDataModule")
    return dm


def build_model(model_cfg: DictConfig, dm: TransferDataModule | None = None, *,
                input_shape: tuple[int, ...] | None = None, num_classes: int | None = None) -> Classifier:
    c, _, s = input_shape or dm.input_shape
    return instantiate(model_cfg, in_channels=c, image_size=s,
                       num_classes=num_classes or dm.num_classes)


def source_spec(cfg: DictConfig, dm: TransferDataModule) -> dict:
    """Everything that determines the source weights: the store key is its hash."""
    scheduler = scheduler_of(cfg, "source")
    return {**({"scheduler": scheduler} if scheduler != "none" else {}),  # keys of older entries stay valid
            "data": OmegaConf.to_container(cfg.source.data, resolve=True),
            "input_shape": list(dm.input_shape), "num_classes": dm.num_classes,
            "model": OmegaConf.to_container(cfg.source.model, resolve=True),
            "optimizer": OmegaConf.to_container(cfg.source.optimizer, resolve=True),
            "epochs": cfg.source.epochs, "trainer": OmegaConf.to_container(cfg.source.trainer, resolve=True),
            "precision": str(cfg.trainer.get("precision")), "seed": int(cfg.seed),
            "versions": {"torch": torch.__version__, "lightning": L.__version__,
                         "transfer_lab": transfer_lab.__version__}}


def source_stage(cfg: DictConfig, strategy: Strategy, dm: TransferDataModule | None,
                 devices: Any = None) -> tuple[Classifier | None, dict]:
    """The trained source model: from ``source.checkpoint``, from the store, or trained now.

    Under DDP only global rank 0 trains (on one device: the key does not hold the device count,
    so the weights must not depend on it); the other ranks wait for the store entry and load it.
    """
    if not strategy.needs_source:
        return None, {"used": False, "cache_hit": None}
    if cfg.source.get("checkpoint"):
        return checkpoint_source(cfg, dm)
    spec = source_spec(cfg, dm)
    key = store_key(spec)

    def train() -> tuple[dict, dict, dict]:
        log.info("training source %s (%s on %s)", key, cfg.source.model._target_, cfg.source.data._target_)
        L.seed_everything(int(cfg.seed), verbose=False)
        model = build_model(cfg.source.model, dm)
        module = TransferModule(model, Scratch(), instantiate(cfg.source.optimizer, _partial_=True),
                                lr=float(cfg.source.optimizer.lr), num_classes=dm.num_classes,
                                scheduler=scheduler_of(cfg, "source"),
                                task=task_of(dm), target_norm=getattr(dm, "target_norm", None))
        trainer = make_trainer(cfg, "source", Path(cfg.store_dir) / ".logs" / key, [], devices)
        trainer.fit(module, datamodule=dm)
        tested = trainer.test(module, datamodule=dm, verbose=False)[0]
        return model.state_dict(), {**spec, "key": key}, {k: float(v) for k, v in tested.items()}

    t0 = time.perf_counter()
    store = SourceStore(cfg.store_dir)
    if rank_zero_only.rank != 0:
        wait_for_entry(store, key)
    state, _, metrics, hit = store.get_or_create(key, train)
    model = build_model(cfg.source.model, dm)
    model.load_state_dict(state)
    return model, {"used": True, "key": key, "cache_hit": hit, **metrics,
                   "load_or_train_s": round(time.perf_counter() - t0, 3)}


def wait_for_entry(store: SourceStore, key: str, poll_s: float = 0.5) -> None:
    """A non-zero rank's barrier: rank 0 trains the source (alone, on one device) and saves it."""
    while not store.is_valid(key):
        time.sleep(poll_s)


def checkpoint_source(cfg: DictConfig, dm: TransferDataModule) -> tuple[Classifier, dict]:
    """An external source: a knowledge package, safetensors file or weights-only checkpoint."""
    path = cfg.source.checkpoint
    model = load_into(build_model(cfg.source.model, dm), load_state_dict(path), f"source.checkpoint={path}")
    return model, {"used": True, "checkpoint": str(path), "cache_hit": None}


def make_trainer(cfg: DictConfig, stage: str, out_dir: Path, callbacks: list,
                 devices: Any = None) -> L.Trainer:
    """The shared ``trainer`` config plus the stage's own ``epochs`` and ``trainer`` overrides."""
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
    kwargs.setdefault("max_epochs", int(cfg[stage].epochs))
    # callbacks from the trainer config (e.g. performance options) run beside the strategy's
    configured = [instantiate(c) for c in kwargs.pop("callbacks", None) or []]
    if any(isinstance(c, ModelCheckpoint) for c in callbacks):
        kwargs["enable_checkpointing"] = True
    return instantiate(kwargs, logger=make_loggers(cfg.get("logger", "csv"), out_dir, stage),
                       callbacks=[*configured, *callbacks], default_root_dir=str(out_dir))


def make_loggers(spec: str | list | None, out_dir: Path, stage: str) -> list:
    """``logger=csv`` (default), ``tensorboard``, ``csv,tensorboard`` or ``none``."""
    names = logger_names(spec)
    loggers: list = []
    if "csv" in names:
        loggers.append(CSVLogger(str(out_dir), name=stage, version=""))
    if "tensorboard" in names:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out_dir), name=f"tb_{stage}", version=""))
    return loggers or False


def logger_names(spec: str | list | None) -> list[str]:
    items = spec.split(",") if isinstance(spec, str) else list(spec or [])
    names = [str(n).strip() for n in items if str(n).strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise ConfigError(f"logger={spec}: unknown {bad[0]!r}; valid: {', '.join(LOGGERS)} (comma-separated)")
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401 — Lightning's own check fails later and less clearly
        except ImportError:
            raise ConfigError("logger=tensorboard: the tensorboard package is not installed; "
                              "pip install 'transfer_lab[tensorboard]'") from None
    return names


def save_weights(model: torch.nn.Module, out_dir: Path, mode: str, source_key: str | None) -> dict:
    """``auto``: only what trained when anything is frozen (the rest is the source's), else all."""
    frozen = any(not p.requires_grad for p in model.parameters())
    if mode == "none":
        return {"mode": "none"}
    if mode == "trainable" or (mode == "auto" and frozen):
        path = save_trainable(model, out_dir / "target_trainable.safetensors", source_key)
        return {"mode": "trainable", "file": path.name, "source_key": source_key}
    path = atomic_save_safetensors(out_dir / "target.safetensors", model.state_dict())
    return {"mode": "full", "file": path.name, "source_key": source_key}


def environment() -> dict:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__, "transfer_lab": transfer_lab.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "platform": platform.platform(), "git": rev}
