"""Entry point: ``python -m transfer_lab.train [overrides]`` (console script ``transfer-lab``).

In a sweep (``-m``) each cell is one call of ``main``. A cell whose directory already holds an ``ok``
results.json of the same resolved config is skipped (``resume=false`` re-runs it). With a parallel
launcher (``hydra/launcher=parallel``, n_jobs > 1) each job takes a slot and runs on that slot's
GPU (slot mod #GPUs) or, without GPUs, on its own share of the CPU cores.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from transfer_lab.data.datamodule import ConfigError

log = logging.getLogger("transfer_lab")
# the cores this process may use, read before any job narrows them (joblib reuses worker processes)
ALL_CPUS = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
    list(range(os.cpu_count() or 1))


def placement(slot: int, n_slots: int, n_gpus: int, cpus: list[int]) -> dict[str, Any]:
    """Where job slot ``slot`` of ``n_slots`` runs: GPU ``slot mod n_gpus`` when there are GPUs,
    otherwise an equal, disjoint share of ``cpus`` (wrapping when there are more slots than cores).

    Returns ``{"gpu": int | None, "cpus": list[int] | None, "threads": int | None}``.
    """
    if n_slots < 1 or slot < 0:
        raise ValueError(f"slot {slot} of {n_slots}: need 0 <= slot and n_slots >= 1")
    if n_gpus > 0:
        return {"gpu": slot % n_gpus, "cpus": None, "threads": None}
    share = max(1, len(cpus) // n_slots)
    start = (slot % n_slots) * share % len(cpus)
    mine = cpus[start:start + share]
    return {"gpu": None, "cpus": mine, "threads": len(mine)}


@contextlib.contextmanager
def job_slot(lock_dir: Path, job_num: int, n_slots: int) -> Iterator[int]:
    """Hold one of ``n_slots`` slot locks for the job's lifetime: job i prefers slot i mod n, and
    takes a free one when that is busy (joblib hands jobs to whichever worker is free, so i mod n
    alone could put two running jobs on one GPU)."""
    from filelock import FileLock, Timeout

    lock_dir.mkdir(parents=True, exist_ok=True)
    first = job_num % n_slots
    for k in [*range(first, n_slots), *range(first)]:
        lock = FileLock(str(lock_dir / f"slot{k}.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue
        try:
            yield k
        finally:
            lock.release()
        return
    with FileLock(str(lock_dir / f"slot{first}.lock")):
        yield first


def apply_placement(cfg: DictConfig, where: dict[str, Any]) -> Any:
    """Pin this process to its CPU share; return the ``devices`` override for its GPU (or None)."""
    if where["gpu"] is not None:
        if str(cfg.trainer.accelerator) in ("auto", "gpu", "cuda") and str(cfg.trainer.devices) == "1":
            return [where["gpu"]]
        return None
    import torch

    torch.set_num_threads(where["threads"])
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, where["cpus"])
    return None


def summary(res: dict, skipped: bool = False) -> str:
    m, src = res["metrics"], res["source"]
    head = f"[{res['strategy']} seed={res['seed']}]" + (" skipped (done):" if skipped else "")
    return (f"{head} target test/acc={m['test/acc']:.4f} "
            f"source test/acc={src.get('test/acc', float('nan')):.4f} "
            f"cache_hit={src.get('cache_hit')} params trainable={res['params']['trainable']:,}"
            f"/{res['params']['total']:,} time={res['timings']['total_s']:.1f}s")


# absolute: a relative path would resolve as a Python package when main is imported (console
# script `transfer-lab`, tests) rather than run as __main__
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    from lightning.pytorch.utilities import rank_zero_only

    from transfer_lab.run import completed, run  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    done = completed(cfg, out_dir)
    if done is not None:
        print(summary(done, skipped=True), flush=True)
        return done["metrics"]["test/acc"]
    n_jobs = int(hc.launcher.get("n_jobs") or 1) if hc.mode == RunMode.MULTIRUN else 1
    if n_jobs < 0:  # joblib's -1: one job per core
        n_jobs = os.cpu_count() or 1
    slot_ctx = (job_slot(Path(hc.sweep.dir) / ".slots", int(hc.job.num), n_jobs) if n_jobs > 1
                else contextlib.nullcontext(None))
    try:
        with slot_ctx as slot:
            devices = None
            if slot is not None:
                import torch

                where = placement(slot, n_jobs, torch.cuda.device_count(), ALL_CPUS)
                log.info("job %s: slot %d → %s", hc.job.num, slot, where)
                devices = apply_placement(cfg, where)
            res = run(cfg, out_dir, choices, devices=devices)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if rank_zero_only.rank == 0:  # one line per finished cell, not one per DDP rank
        print(summary(res), flush=True)
    return res["metrics"]["test/acc"]


if __name__ == "__main__":
    main()
