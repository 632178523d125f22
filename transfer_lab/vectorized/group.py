"""A sweep's cells that differ only in ``seed``, trained as one vectorised group; each cell's
``results.json`` written as its own run would write it.

A cell is prepared by ``run.prepare`` (validation, data, seeded target build) and its source
comes from ``source_stage``, exactly as ``run.run`` does; only the target stage is shared.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from transfer_lab.builders import (last_checkpoint, make_trainer, resume_callbacks, schedule_factory,
                                   set_rng_state)
from transfer_lab.convergence import judge
from transfer_lab.results import save_weights, write_results
from transfer_lab.run import prepare, selection_of, start_record
from transfer_lab.source_stage import source_stage, transferability_scores
from transfer_lab.vectorized.data import NotVectorisable
from transfer_lab.vectorized.engine import check_group, fit_seeds
from transfer_lab.vectorized.select import MONITORS
from transfer_lab.vectorized.terms import vectorizable

log = logging.getLogger("transfer_lab")
MIN_GROUP = 2  # one seed alone gains nothing: it runs the ordinary way


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
    if trainer.get("callbacks") or (cfg.target.get("trainer") or {}).get("callbacks") \
            or any(v is not None for v in (cfg.get("callbacks") or {}).values()):
        return False, ("Lightning callbacks (callbacks=..., e.g. trainer=fast's compile/channels-last, "
                       "early_stopping) act on one model, not K")
    target = cfg.target
    # schedules and target.select=best_val are per seed (the schedule factory over the stacked
    # groups, select.SeedSelection); early stopping would stop all K seeds at once
    if target.get("early_stopping"):
        return False, "early stopping (target.early_stopping) stops one model, not one seed of K"
    if target.get("monitor") is not None and str(target.monitor) not in MONITORS:
        return False, f"target.monitor={target.monitor} (a group selects on {' or '.join(MONITORS)})"
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
    started = time.perf_counter()
    cells = [_build_cell(cfg, ch) for cfg, ch in zip(cfgs, choices)]
    strategies = [c["strategy"] for c in cells]
    dms = [c["target_dm"] for c in cells]
    cfg = cfgs[0]
    optimizer = instantiate(cfg.target.optimizer, _partial_=True)
    try:
        check_group(strategies, dms, optimizer)
    except NotVectorisable as e:
        log.info("seeds %s trained one at a time: %s", [int(c.seed) for c in cfgs], e)
        return None
    # one directory per set of seeds: a checkpoint of K seeds never resumes a group of other seeds
    # (a re-run after some cells finished another way trains the rest from their start)
    group_dir = Path(group_dir) / ("seeds-" + "-".join(str(int(c.seed)) for c in cfgs))
    ckpt_dir = group_dir / "checkpoints"
    trainer = make_trainer(cfg, "target", group_dir, resume_callbacks(cfg, ckpt_dir))
    resume_from = last_checkpoint(ckpt_dir) if cfg.get("resume", True) else None
    selection = selection_of(cfg, dms[0], ckpt_dir)  # the separate run's select, monitor and mode
    t0 = time.perf_counter()
    try:
        seeds = fit_seeds([c["model"] for c in cells], strategies, dms, optimizer,
                          float(cfg.target.optimizer.lr), trainer, scheduler=schedule_factory(cfg, "target"),
                          source_dms=[c["source_dm"] for c in cells],
                          ckpt_path=str(resume_from[0]) if resume_from else None,
                          select=selection.select, monitor=selection.monitor,
                          mode=getattr(cfg.get("vectorize_mode"), "value", cfg.get("vectorize_mode")) or "auto")
    except NotVectorisable as e:  # raised before the first step (e.g. loaders of unequal length)
        log.info("seeds %s trained one at a time: %s", [int(c.seed) for c in cfgs], e)
        return None
    target_s = time.perf_counter() - t0
    trained = {"epochs": int(trainer.current_epoch), "steps": int(trainer.global_step), "world_size": 1,
               "resumed_after_epoch": resume_from[1] if resume_from else None,
               "vectorized_seeds": [int(x.seed) for x in cfgs]}
    # the group's target time, shared equally: what each cell cost
    shares = {"target_s": round(target_s / len(cells), 3),
              "total_s": round((time.perf_counter() - started) / len(cells), 3)}
    out = [_write_cell(cell, res, Path(d), c, trained, shares)
           for cell, res, d, c in zip(cells, seeds, out_dirs, cfgs)]
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out


def _write_cell(cell: dict, res, out_dir: Path, cfg: DictConfig, trained: dict, shares: dict) -> dict:
    """One cell's ``results.json``, with the keys ``run.run`` writes."""
    results = cell["results"]
    results["metrics"] = res.metrics
    if res.per_class is not None:
        results["per_class"] = {"test/acc": res.per_class}
    results["strategy_report"] = cell["strategy"].report()
    results["target_training"] = dict(trained)
    # the keys run.run writes: what each seed tested (its last or its own best-validation
    # weights) and its own curve judged by the same rule
    results["selection"] = res.selection
    results["convergence"] = judge(res.history, int(trained["steps"]), res.selection["monitor"],
                                   res.selection["mode"], **OmegaConf.to_container(cfg.target.convergence))
    results["timings"] = {"source_s": cell["source_s"], **shares}
    results["status"] = "ok"
    results["weights"] = save_weights(res.model, out_dir, cfg.target.save_weights, results["source"].get("key"))
    write_results(out_dir, results)
    return results


def _build_cell(cfg: DictConfig, choices: dict) -> dict[str, Any]:
    """One cell up to its built model, as ``run.run`` builds it (so its RNG draws are the same)."""
    p = prepare(cfg)
    strategy, source_dm, target_dm = p.strategy, p.source_dm, p.target_dm
    results = start_record(cfg, dict(choices))
    results["strategy"] = results["strategy"] or strategy.name
    t0 = time.perf_counter()
    source, results["source"] = source_stage(cfg, strategy, source_dm, model=p.source_model)
    source_s = round(time.perf_counter() - t0, 3)
    if source is not None and cfg.get("transferability", True):
        results["transferability"] = transferability_scores(source, target_dm)
    set_rng_state(p.target_rng)  # the strategy's new layers draw as if built right after the target
    model = strategy.build(source, p.target_model)
    results["data"] = {"target": {**target_dm.summary(),
                                  "samples_per_class": cfg.target.data.get("samples_per_class")}}
    results["params"] = {"total": sum(p.numel() for p in model.parameters()),
                         "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    return {"strategy": strategy, "source_dm": source_dm, "target_dm": target_dm, "model": model,
            "results": results, "source_s": source_s}

