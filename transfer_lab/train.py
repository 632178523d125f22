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

from transfer_lab.errors import ConfigError
from transfer_lab.sweep import record_cell

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


def headline(metrics: dict) -> str:
    """The run's headline metric key: ``test/acc``, or ``test/r2`` for a regression run (the
    results loader's rule; imported here, after training, to keep start-up light)."""
    from transfer_lab.analysis.collect import headline as metric

    return f"test/{metric(metrics) or 'acc'}"


def summary(res: dict, skipped: bool = False) -> str:
    m, src = res["metrics"], res["source"]
    key = headline(m)
    head = f"[{res['strategy']} seed={res['seed']}]" + (" skipped (done):" if skipped else "")
    return (f"{head} target {key}={m[key]:.4f} "
            f"source {key}={src.get(key, float('nan')):.4f} "
            f"cache_hit={src.get('cache_hit')} params trainable={res['params']['trainable']:,}"
            f"/{res['params']['total']:,} time={res['timings']['total_s']:.1f}s")


# absolute: a relative path would resolve as a Python package when main is imported (console
# script `transfer-lab`, tests) rather than run as __main__
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def check_choices(args: list[str], conf_dir: str | Path = CONF_DIR) -> None:
    """Every ``group=option`` (or ``group@package=option``, sweeps ``a,b,c``) on the command line
    names a YAML of ``conf/<group>/``: a typo is one line listing the valid options, where
    Hydra's own message is twenty. Sweep functions, globs and interpolations are left to Hydra."""
    conf = Path(conf_dir)
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.lstrip("+~").split("=", 1)
        group = key.split("@", 1)[0]
        if group.startswith("hydra/") or not (conf / group).is_dir() or any(c in value for c in "()[]{}$*"):
            continue
        valid = sorted(p.relative_to(conf / group).with_suffix("").as_posix()
                       for p in (conf / group).rglob("*.yaml") if not p.name.startswith("_"))
        for option in (v.strip().strip("'\"") for v in value.split(",")):
            if option not in ("null", "") and option not in valid:
                raise ConfigError(f"{key}={option}: unknown option (Could not find '{group}/{option}'); "
                                  f"valid: {', '.join(valid)}")


def check_overrides(args: list[str], conf_dir: str | Path = CONF_DIR) -> None:
    """Compose a single run's config once before Hydra does, so a composition error (a key not in
    the config, a bad value syntax) is one line; sweeps get the group check only. Command lines
    that change where configs come from (``-cd``, ``hydra.searchpath``) or Hydra's own handling
    (``--cfg``, ``--help``, ...) are left to Hydra entirely."""
    if any(a.startswith(("-cd", "--config-dir", "-cp", "--config-path")) or
           a.lstrip("+~").startswith("hydra.searchpath") for a in args):
        return
    check_choices(args, conf_dir)
    sweep = any(a in ("-m", "--multirun") or a.replace(" ", "") == "hydra.mode=MULTIRUN" for a in args)
    if sweep or any(a.startswith("-") for a in args):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = [a for a in args if not a.lstrip("+~").startswith("hydra")]
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            compose("train", overrides=overrides)
    except Exception as e:  # noqa: BLE001 — Hydra/OmegaConf errors of any kind become one line
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip() and "HYDRA_FULL_ERROR" not in ln]
        if e.__cause__ is not None and str(e.__cause__).strip():  # the schema's reason (type, choices)
            lines.append("(" + str(e.__cause__).strip().splitlines()[0] + ")")
        raise ConfigError(_culprit(overrides, str(e)) + (" ".join(lines) or type(e).__name__)) from None
    finally:
        GlobalHydra.instance().clear()


def _culprit(overrides: list[str], message: str) -> str:
    """``'<override>: '`` for the override that fails to parse alone, unless the message names it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for o in overrides:
        try:
            parser.parse_overrides([o])
        except Exception:  # noqa: BLE001
            return "" if o in message else f"{o}: "
    return ""


def main() -> float | None:
    """``python -m transfer_lab.train`` / ``transfer-lab``: check the command line, then run Hydra
    (``HYDRA_FULL_ERROR=1`` skips the check and shows Hydra's own error with its trace)."""
    if not os.environ.get("HYDRA_FULL_ERROR"):
        try:
            check_overrides(sys.argv[1:])
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    return hydra_main()


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    """One cell. A single run's bad config exits 2 with one line, any other failure 1; in a sweep
    the failure is recorded (results.json and the cell's status) and the sweep goes on."""
    from transfer_lab.results import RunFailed  # heavy imports after Hydra has parsed the command line

    hc = HydraConfig.get()
    sweep = hc.mode == RunMode.MULTIRUN
    try:
        res, skipped = run_cell(cfg, hc)
    except (ConfigError, RunFailed) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if not sweep:
            sys.exit(2 if isinstance(e, ConfigError) else 1)
        record_cell(hc.sweep.dir, hc.job.num, "failed", hc.runtime.output_dir, str(e))
        return float("nan")  # a failed trial for an Optuna sweeper
    if sweep:
        record_cell(hc.sweep.dir, hc.job.num, "skipped" if skipped else "ok", hc.runtime.output_dir)
    return objective(cfg, res)


def objective(cfg: DictConfig, res: dict) -> float:
    """What a sweeper optimises: ``optimized_metric`` (a validation metric: the test split is
    never seen by a sweeper) when set, else the run's headline test metric."""
    name = cfg.get("optimized_metric")
    if name:
        if name not in res["metrics"]:
            raise ConfigError(f"optimized_metric={name}: not among this run's metrics "
                              f"({', '.join(sorted(res['metrics']))})")
        return res["metrics"][name]
    return res["metrics"][headline(res["metrics"])]


def run_cell(cfg: DictConfig, hc: Any) -> tuple[dict, bool]:
    """The cell's results (``skipped``: already done by an earlier run of the same config)."""
    from lightning.pytorch.utilities import rank_zero_only

    from transfer_lab.results import completed
    from transfer_lab.run import run

    out_dir = hc.runtime.output_dir
    choices = {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/")}
    done = completed(cfg, out_dir)
    if done is not None:
        print(summary(done, skipped=True), flush=True)
        return done, True
    n_jobs = int(hc.launcher.get("n_jobs") or 1) if hc.mode == RunMode.MULTIRUN else 1
    if n_jobs < 0:  # joblib's -1: one job per core
        n_jobs = os.cpu_count() or 1
    slot_ctx = (job_slot(Path(hc.sweep.dir) / ".slots", int(hc.job.num), n_jobs) if n_jobs > 1
                else contextlib.nullcontext(None))
    with slot_ctx as slot:
        devices, threads = None, None
        if slot is not None:
            import torch

            where = placement(slot, n_jobs, torch.cuda.device_count(), ALL_CPUS)
            log.info("job %s: slot %d → %s", hc.job.num, slot, where)
            devices, threads = apply_placement(cfg, where), where["threads"]
        res = run(cfg, out_dir, choices, devices=devices, job_threads=threads)
    if rank_zero_only.rank == 0:  # one line per finished cell, not one per DDP rank
        print(summary(res), flush=True)
    return res, False


if __name__ == "__main__":
    main()
