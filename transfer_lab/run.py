"""One run, top to bottom: check and build everything (``prepare``), then source stage →
strategy → target stage → ``results.json`` (``run``).

The leaves come from ``builders``, the source from ``source_stage``; this file is the wiring.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from transfer_lab.builders import (build_model, last_checkpoint, make_callbacks, make_datamodule,
                                   make_loggers, make_module, make_strategy, make_trainer,
                                   readable_checkpoint, remove_resume_state, resume_callbacks, rng_state,
                                   schedule_factory, set_rng_state, task_of, without_weights)
from transfer_lab.convergence import ConvergenceCheck
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.data.prepared_cache import prepare_cached
from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.results import (RunFailed, config_hash, environment, one_line, record_failure,
                                  save_weights, write_results)
from transfer_lab.selection import Selection
from transfer_lab.source_stage import has_data, pretrained_model, source_stage, transferability_scores
from transfer_lab.strategies.base import Strategy
from transfer_lab.validate import preflight_build, validate_config

log = logging.getLogger("transfer_lab")
# Lightning's per-Trainer banners ("GPU available", tips) drown a sweep's one-line summaries
for _name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
              "lightning.fabric.utilities.rank_zero"):
    logging.getLogger(_name).setLevel(logging.WARNING)
warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")


@dataclass
class Prepared:
    """Everything ``run`` needs, checked and built once."""

    strategy: Strategy
    source_dm: TransferDataModule | None
    target_dm: TransferDataModule
    target_model_cfg: DictConfig
    source_model: Classifier | None = None
    target_model: Classifier | None = None
    target_rng: dict | None = None  # the RNG state right after the seeded target build


def prepare(cfg: DictConfig) -> Prepared:
    """Instantiate and validate everything before any training: bad input fails here.

    Order: the config against the constructors (types, unknown keys, ``???``), then the data
    (classes, budgets, files), then the strategy's ``build`` on the models themselves (layer
    globs, strict copies, source/target compatibility) — so nothing trains before a mistake shows.
    """
    validate_config(cfg)
    for stage in ("source", "target"):
        schedule_factory(cfg, stage)  # the old string form or a bad schedule fails here
    # constructing loggers and callbacks writes nothing: a bad option or missing package shows now
    make_loggers(cfg, Path("."), "preflight")
    make_callbacks(cfg)
    check_lengths(cfg)
    strategy = make_strategy(cfg)
    source_dm = None
    if strategy.needs_source and has_data(cfg.source.data):  # data=none: a pretrained model as it is
        source_dm = prepare_cached(make_datamodule(cfg.source.data, cfg.seed, "source.data",
                                                   model_cfg=cfg.source.model))
    # the target data is normalised for the model that reads it: its own, or the source's it inherits;
    # a study's later trials reuse the data an earlier trial prepared (each its own module)
    target_dm = prepare_cached(make_datamodule(cfg.target.data, cfg.seed, "target.data",
                                               default_shape=source_dm.input_shape if source_dm else None,
                                               model_cfg=cfg.target.get("model") or cfg.source.model))
    for key, dm in (("target.data", target_dm), ("source.data", source_dm)):
        if dm is not None and task_of(dm) not in strategy.tasks:
            raise ConfigError(f"strategy._target_={cfg.strategy._target_}: handles {', '.join(strategy.tasks)} "
                              f"tasks, but {key} is a {task_of(dm)} task (regression: scratch, finetune, "
                              "linear_probe, partial, l2sp)")
    selection_of(cfg, target_dm, Path("."))  # a bad select / monitor / early_stopping fails here
    # an inherited config starts random (scratch) or from the source: never from the source's file
    tgt_model_cfg = cfg.target.get("model") or without_weights(cfg.source.model)
    source = None
    if source_dm is not None:  # the store's or the checkpoint's state dict replaces every weight
        source = build_model(without_weights(cfg.source.model), source_dm, key="source.model")
    elif strategy.needs_source:
        source = pretrained_model(cfg, target_dm.input_shape)
    # the target init is the same whatever the source path (trained, stored, external)
    L.seed_everything(int(cfg.seed), verbose=False)
    target = build_model(tgt_model_cfg, target_dm, key="target.model")
    target_rng = rng_state()
    preflight_build(strategy, source, target)  # on copies: the models stay untouched
    return Prepared(strategy, source_dm, target_dm, tgt_model_cfg, source, target, target_rng)


def check_lengths(cfg: DictConfig) -> None:
    """``steps`` a whole number ≥ 0 or null; ``val_check_interval`` steps ≥ 1 (or a fraction of
    an epoch in (0, 1]). (Schedules span ``trainer.estimated_stepping_batches``: steps or epochs.)"""
    for stage in ("source", "target"):
        steps, every = cfg[stage].get("steps"), cfg[stage].get("val_check_interval")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ConfigError(f"{stage}.steps={steps!r}: expected a whole number of optimizer steps ≥ 0, "
                              f"or null to train for {stage}.epochs")
        if every is not None and (isinstance(every, bool) or not isinstance(every, (int, float))
                                  or (isinstance(every, int) and every < 1)
                                  or (isinstance(every, float) and not 0 < every <= 1)):
            raise ConfigError(f"{stage}.val_check_interval={every!r}: expected steps ≥ 1 or a fraction "
                              "of an epoch in (0, 1]")


def run(cfg: DictConfig, out_dir: str | Path, choices: dict[str, Any] | None = None,
        devices: Any = None, job_threads: int | None = None) -> dict:
    """Run one source → target transfer and write ``<out_dir>/results.json``. Returns the results.

    Any failure is a record: ``results.json`` with ``status: failed``, the ``stage`` (config,
    source, target, save) and a one-line ``error`` (the traceback goes to the log file). A bad
    config raises ``ConfigError``; any other failure ``RunFailed`` with that line.
    ``devices`` (e.g. ``[1]`` from a parallel sweep's placement) replaces ``trainer.devices``
    without entering the config, so it does not change the config hash that resuming compares;
    ``job_threads``: the CPU threads a parallel launcher gave this job (recorded in ``env``).
    """
    out_dir, started = Path(out_dir), time.perf_counter()
    results = start_record(cfg, dict(choices or {}), job_threads)
    stage = "config"
    try:
        t0 = time.perf_counter()
        p = prepare(cfg)
        prepare_s = time.perf_counter() - t0
        results["strategy"] = results["strategy"] or p.strategy.name
        stage = "source"
        t0 = time.perf_counter()
        source, results["source"] = source_stage(cfg, p.strategy, p.source_dm, devices, model=p.source_model)
        if source is not None and cfg.get("transferability", True):
            results["transferability"] = transferability_scores(source, p.target_dm)
        source_s = time.perf_counter() - t0
        stage = "target"
        t0 = time.perf_counter()
        model, is_zero = target_stage(cfg, p, source, out_dir, devices, results)
        results["timings"] = {"prepare_s": round(prepare_s, 3), "source_s": round(source_s, 3),
                              "target_s": round(time.perf_counter() - t0, 3),
                              "total_s": round(time.perf_counter() - started, 3)}
        stage, results["status"] = "save", "ok"
        if is_zero:
            results["weights"] = save_weights(model, out_dir, cfg.target.save_weights,
                                              results["source"].get("key"))
            write_results(out_dir, results)
            remove_resume_state(out_dir)  # weights saved: last.ckpt, best.ckpt, hpc_ckpt_* not needed
        return results
    except Exception as e:  # noqa: BLE001 — every failure becomes a record and one line
        line = one_line(e) if rank_zero_only.rank != 0 else record_failure(out_dir, results, stage, e)
        readable_checkpoint(out_dir / "checkpoints")  # drops a checkpoint the failure left half-written
        if isinstance(e, ConfigError):
            raise
        raise RunFailed(f"{stage} stage failed: {line}") from e


def start_record(cfg: DictConfig, choices: dict[str, Any], job_threads: int | None = None) -> dict[str, Any]:
    """The results.json fields known before anything runs (readable even for a broken config)."""
    try:
        config, digest = OmegaConf.to_container(cfg, resolve=True), config_hash(cfg)
    except Exception:  # noqa: BLE001 — an unresolvable config is recorded as written
        config, digest = OmegaConf.to_container(cfg, resolve=False), None
    seed = cfg.get("seed")
    return {"status": "running", "strategy": choices.get("strategy"),
            "seed": seed if isinstance(seed, int) else None, "choices": choices,
            "config_hash": digest, "config": config, "env": environment(job_threads)}


def target_stage(cfg: DictConfig, p: Prepared, source: Classifier | None, out_dir: Path,
                 devices: Any, results: dict) -> tuple[torch.nn.Module, bool]:
    """Build the target from the source, train and test it; fills ``results``. Returns the model
    and whether this process is global rank 0 (the one that writes)."""
    strategy, target_dm = p.strategy, p.target_dm
    set_rng_state(p.target_rng)  # the strategy's new layers draw as if built right after the target
    model = strategy.build(source, p.target_model)
    module = make_module(cfg, "target", model, strategy, target_dm, class_weights=target_dm.class_weights)
    results["data"] = {"target": {**target_dm.summary(),
                                  "samples_per_class": cfg.target.data.get("samples_per_class")}}
    results["params"] = {"total": sum(q.numel() for q in model.parameters()),
                         "trainable": sum(q.numel() for q in model.parameters() if q.requires_grad)}
    ckpt_dir = out_dir / "checkpoints"
    selection = selection_of(cfg, target_dm, ckpt_dir)
    convergence = ConvergenceCheck(selection.monitor, selection.mode, **(cfg.target.get("convergence") or {}))
    trainer = make_trainer(cfg, "target", out_dir, [*strategy.callbacks(), *resume_callbacks(cfg, ckpt_dir),
                                                    *selection.callbacks(), convergence], devices)
    resume_from = last_checkpoint(ckpt_dir) if cfg.get("resume", True) else None
    trainer.fit(module, datamodule=strategy.datamodule(target_dm, p.source_dm),
                ckpt_path=str(resume_from[0]) if resume_from else None)
    # the last validation's train/val figures: trainer.test resets callback_metrics
    fitted = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    ckpt_path, results["selection"] = selection.chosen(trainer)
    if ckpt_path and results["selection"]["value"] is not None:
        # the tested model's validation figure: what optimized_metric hands a sweeper
        fitted[selection.monitor] = results["selection"]["value"]
    results["convergence"] = convergence.result
    tested = trainer.test(module, datamodule=target_dm, verbose=False, ckpt_path=ckpt_path)[0]
    results["metrics"] = {**fitted, **{k: float(v) for k, v in tested.items()}}
    if module.test_per_class is not None:
        results["per_class"] = {"test/acc": module.test_per_class}
    results["strategy_report"] = strategy.report()
    results["target_training"] = {"epochs": int(trainer.current_epoch), "steps": int(trainer.global_step),
                                  "world_size": trainer.world_size,
                                  "resumed_after_epoch": resume_from[1] if resume_from else None}
    return model, trainer.is_global_zero


def selection_of(cfg: DictConfig, target_dm: TransferDataModule, ckpt_dir: Path) -> Selection:
    """The target's model selection (``target.select``, ``monitor``, ``early_stopping``)."""
    select = cfg.target.get("select") or "last"
    return Selection(getattr(select, "value", select), task_of(target_dm), ckpt_dir,
                     cfg.target.get("early_stopping"), cfg.target.get("monitor"))
