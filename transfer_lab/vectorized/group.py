"""A sweep's cells that differ only in ``seed``, trained as one vectorised group; each cell's
``results.json`` written as its own run would write it.

Wiring: the run's builders are imported from ``transfer_lab.run`` in one place (``_run``), so the
lead can re-point them when ``run.py`` is split (builders / source stage).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from transfer_lab.io import atomic_write_json
from transfer_lab.results import config_hash
from transfer_lab.vectorized.data import NotVectorisable
from transfer_lab.vectorized.engine import check_group, fit_seeds
from transfer_lab.vectorized.terms import vectorizable

log = logging.getLogger("transfer_lab")
MIN_GROUP = 2  # one seed alone gains nothing: it runs the ordinary way


def _run():
    """The run's builders (today in ``transfer_lab.run``): the one import site to re-point."""
    from transfer_lab import run

    return run


def group_key(overrides: list[str]) -> tuple[str, ...]:
    """What a cell's overrides say besides its seed: cells with the same key form one group."""
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") != "seed"))


def cheap_check(cfg: DictConfig) -> tuple[bool, str]:
    """Whether this cell may join a group, from its config alone (before building anything)."""
    if not cfg.get("vectorize_seeds", True):
        return False, "vectorize_seeds=false"
    trainer = cfg.get("trainer") or {}
    devices = trainer.get("devices", 1)
    if (isinstance(devices, int) and devices > 1) or (isinstance(devices, list) and len(devices) > 1) \
            or "ddp" in str(trainer.get("strategy")) or int(trainer.get("num_nodes", 1) or 1) > 1:
        return False, "multi-device training (DDP)"
    if trainer.get("callbacks") or (cfg.target.get("trainer") or {}).get("callbacks"):
        return False, "trainer callbacks (e.g. trainer=fast's compile/channels-last) act on one model"
    try:
        strategy = instantiate(cfg.strategy)
    except Exception as e:  # noqa: BLE001 — a broken strategy config fails in its own cell, loudly
        return False, f"strategy does not instantiate ({e})"
    return vectorizable(strategy, str(cfg.target.optimizer.get("_target_")))


def run_group(cfgs: list[DictConfig], out_dirs: list[str | Path], choices: list[dict],
              group_dir: str | Path) -> list[dict] | None:
    """Train the cells ``cfgs`` (equal but for ``seed``) as one vectorised model and write each
    ``<out_dirs[k]>/results.json``. Returns the K results, or None when the group cannot be
    vectorised (the reason is logged; nothing was trained on the target, each cell runs alone)."""
    run = _run()
    started = time.perf_counter()
    cells = [_build_cell(run, cfg, ch) for cfg, ch in zip(cfgs, choices)]
    strategies = [c["strategy"] for c in cells]
    dms = [c["target_dm"] for c in cells]
    cfg = cfgs[0]
    optimizer = instantiate(cfg.target.optimizer, _partial_=True)
    try:
        check_group(strategies, dms, optimizer)
    except NotVectorisable as e:
        log.info("seeds %s trained one at a time: %s", [int(c.seed) for c in cfgs], e)
        return None
    group_dir = Path(group_dir)
    ckpt_dir = group_dir / "checkpoints"
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, monitor=None,
                                 enable_version_counter=False)] if cfg.get("resume", True) else []
    trainer = run.make_trainer(cfg, "target", group_dir, callbacks)
    resume_from = run.last_checkpoint(ckpt_dir) if cfg.get("resume", True) else None
    t0 = time.perf_counter()
    try:
        seeds = fit_seeds([c["model"] for c in cells], strategies, dms, optimizer,
                          float(cfg.target.optimizer.lr), trainer, scheduler=run.scheduler_of(cfg, "target"),
                          source_dms=[c["source_dm"] for c in cells],
                          ckpt_path=str(resume_from[0]) if resume_from else None)
    except NotVectorisable as e:  # raised before the first step (e.g. loaders of unequal length)
        log.info("seeds %s trained one at a time: %s", [int(c.seed) for c in cfgs], e)
        return None
    target_s = time.perf_counter() - t0
    out = []
    for cell, res, out_dir, c in zip(cells, seeds, out_dirs, cfgs):
        results = cell["results"]
        results["metrics"] = res.metrics
        if res.per_class is not None:
            results["per_class"] = {"test/acc": res.per_class}
        results["strategy_report"] = cell["strategy"].report()
        results["target_training"] = {"epochs": int(trainer.current_epoch), "world_size": 1,
                                      "resumed_after_epoch": resume_from[1] if resume_from else None,
                                      "vectorized_seeds": [int(x.seed) for x in cfgs]}
        results["weights"] = run.save_weights(res.model, Path(out_dir), c.target.save_weights,
                                              results["source"].get("key"))
        # the group's target time, shared equally: what each cell cost
        results["timings"] = {"source_s": cell["source_s"], "target_s": round(target_s / len(cells), 3),
                              "total_s": round((time.perf_counter() - started) / len(cells), 3)}
        results["status"] = "ok"
        atomic_write_json(Path(out_dir) / "results.json", results)
        out.append(results)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out


def _build_cell(run, cfg: DictConfig, choices: dict) -> dict[str, Any]:
    """One cell up to its built model, in ``run.run``'s order (so its RNG draws are the same)."""
    strategy, source_dm, target_dm, tgt_model_cfg = run.prepare(cfg)
    results: dict[str, Any] = {
        "status": "running", "strategy": choices.get("strategy") or strategy.name,
        "seed": int(cfg.seed), "choices": dict(choices), "config_hash": config_hash(cfg),
        "config": OmegaConf.to_container(cfg, resolve=True), "env": run.environment()}
    t0 = time.perf_counter()
    source, results["source"] = run.source_stage(cfg, strategy, source_dm)
    source_s = round(time.perf_counter() - t0, 3)
    if source is not None and cfg.get("transferability", True):
        results["transferability"] = run.transferability_scores(source, target_dm)
    L.seed_everything(int(cfg.seed), verbose=False)
    model = strategy.build(source, run.build_model(tgt_model_cfg, target_dm))
    results["data"] = {"target": {**target_dm.summary(),
                                  "samples_per_class": cfg.target.data.get("samples_per_class")}}
    results["params"] = {"total": sum(p.numel() for p in model.parameters()),
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return {"strategy": strategy, "source_dm": source_dm, "target_dm": target_dm, "model": model,
            "results": results, "source_s": source_s}

