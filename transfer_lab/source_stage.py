"""The source stage: the trained source model from ``source.checkpoint``, the store, or trained now.

The store key is the hash of ``source_spec`` (everything that determines the source weights);
concurrent runs wanting one key train it once. Under DDP only global rank 0 trains; the other
ranks wait (with a timeout) for the store entry and load it.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

import transfer_lab
from transfer_lab.builders import build_model, make_module, make_trainer, scheduler_of, task_of
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.models.classifier import Classifier
from transfer_lab.module import NonFiniteLossError
from transfer_lab.store import SourceStore, load_state_dict, store_key
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.scratch import Scratch
from transfer_lab.validate import load_into

log = logging.getLogger("transfer_lab")
#: how long a non-zero DDP rank waits for rank 0's store entry before giving up
WAIT_TIMEOUT_S = 24 * 3600.0


class SourceWaitTimeout(RuntimeError):
    """Rank 0 did not produce the store entry: it failed, or took longer than allowed."""


def source_spec(cfg: DictConfig, dm: TransferDataModule) -> dict:
    """Everything that determines the source weights: the store key is its hash. Keys added later
    (scheduler, steps) enter only when set, so the keys of older entries stay valid."""
    scheduler = scheduler_of(cfg, "source")
    steps = cfg.source.get("steps")
    return {**({"scheduler": scheduler} if scheduler != "none" else {}),
            **({"steps": int(steps)} if steps is not None else {}),
            "data": OmegaConf.to_container(cfg.source.data, resolve=True),
            "input_shape": list(dm.input_shape), "num_classes": dm.num_classes,
            "model": OmegaConf.to_container(cfg.source.model, resolve=True),
            "optimizer": OmegaConf.to_container(cfg.source.optimizer, resolve=True),
            "epochs": cfg.source.epochs, "trainer": OmegaConf.to_container(cfg.source.trainer, resolve=True),
            "precision": str(cfg.trainer.get("precision")), "seed": int(cfg.seed),
            "versions": {"torch": torch.__version__, "lightning": L.__version__,
                         "transfer_lab": transfer_lab.__version__}}


def source_stage(cfg: DictConfig, strategy: Strategy, dm: TransferDataModule | None,
                 devices: Any = None, model: Classifier | None = None) -> tuple[Classifier | None, dict]:
    """The trained source model and its ``results.json`` record.

    ``model``: an already built (untrained) source model to load the weights into; built here
    when None. Under DDP only global rank 0 trains (on one device: the key does not hold the
    device count, so the weights must not depend on it).
    """
    if not strategy.needs_source:
        return None, {"used": False, "cache_hit": None}
    model = model if model is not None else build_model(cfg.source.model, dm, key="source.model")
    if cfg.source.get("checkpoint"):
        return checkpoint_source(cfg, dm, model)
    spec = source_spec(cfg, dm)
    key = store_key(spec)

    def train() -> tuple[dict, dict, dict]:
        log.info("training source %s (%s on %s)", key, cfg.source.model._target_, cfg.source.data._target_)
        # seeded right before the build: the same key always starts from the same weights
        L.seed_everything(int(cfg.seed), verbose=False)
        fresh = build_model(cfg.source.model, dm, key="source.model")
        module = make_module(cfg, "source", fresh, Scratch(), dm)
        trainer = make_trainer(cfg, "source", Path(cfg.store_dir) / ".logs" / key, [], devices)
        try:
            trainer.fit(module, datamodule=dm)
        except NonFiniteLossError as e:  # the module names its (internal) strategy: name the stage
            where = str(e).split(" with strategy=")[0]
            raise NonFiniteLossError(f"{where} while training the source ({cfg.source.model._target_}, "
                                     f"source.optimizer.lr={cfg.source.optimizer.lr})") from None
        tested = trainer.test(module, datamodule=dm, verbose=False)[0]
        return fresh.state_dict(), {**spec, "key": key}, {k: float(v) for k, v in tested.items()}

    t0 = time.perf_counter()
    store = SourceStore(cfg.store_dir)
    if rank_zero_only.rank != 0:
        wait_for_entry(store, key, timeout_s=float(cfg.source.get("wait_timeout_s") or WAIT_TIMEOUT_S))
    try:
        state, _, metrics, hit = store.get_or_create(key, train)
    except Exception as e:  # tell waiting ranks now rather than at their timeout
        mark_failed(store, key, e)
        raise
    model.load_state_dict(state)
    return model, {"used": True, "key": key, "cache_hit": hit, **metrics,
                   "load_or_train_s": round(time.perf_counter() - t0, 3)}


def failure_marker(store: SourceStore, key: str) -> Path:
    return store.root / f".{key}.failed"


def mark_failed(store: SourceStore, key: str, exc: BaseException) -> None:
    """Rank 0 could not produce ``key``: leave a line for the ranks waiting on it."""
    if rank_zero_only.rank == 0:
        try:
            store.root.mkdir(parents=True, exist_ok=True)
            failure_marker(store, key).write_text(f"{type(exc).__name__}: {exc}".splitlines()[0])
        except OSError:
            pass  # a store that cannot be written: the waiting ranks fall back to the timeout


def wait_for_entry(store: SourceStore, key: str, poll_s: float = 0.5,
                   timeout_s: float = WAIT_TIMEOUT_S) -> None:
    """A non-zero rank's barrier: rank 0 trains the source (alone, on one device) and saves it.
    Stops with one line when rank 0 reports a failure (a marker newer than this process) or
    after ``timeout_s`` (``source.wait_timeout_s``)."""
    import psutil

    started = psutil.Process().create_time() - 60  # ranks start together; older markers are stale
    deadline = time.monotonic() + timeout_s
    marker = failure_marker(store, key)
    while not store.is_valid(key):
        if marker.is_file() and marker.stat().st_mtime >= started:
            raise SourceWaitTimeout(f"rank {rank_zero_only.rank}: rank 0 failed to train source {key}: "
                                    f"{marker.read_text().strip()}")
        if time.monotonic() > deadline:
            raise SourceWaitTimeout(f"rank {rank_zero_only.rank}: no store entry {key} from rank 0 after "
                                    f"{timeout_s:.0f}s in {store.root} (source.wait_timeout_s; did rank 0 "
                                    "fail? see its train.log)")
        time.sleep(poll_s)


def checkpoint_source(cfg: DictConfig, dm: TransferDataModule,
                      model: Classifier | None = None) -> tuple[Classifier, dict]:
    """An external source: a knowledge package, safetensors file or weights-only checkpoint."""
    path = cfg.source.checkpoint
    model = model if model is not None else build_model(cfg.source.model, dm, key="source.model")
    load_into(model, load_state_dict(path), f"source.checkpoint={path}")
    return model, {"used": True, "checkpoint": str(path), "cache_hit": None}


def transferability_scores(source: Classifier, dm: TransferDataModule, max_samples: int = 2000) -> dict:
    """LogME and LEEP of the frozen source on the target training set, before any training
    (You et al., 2021; Nguyen et al., 2020). Classification targets whose input the source takes."""
    from transfer_lab.analysis.transferability import transferability

    if task_of(dm) != "classification":
        return {"skipped": "regression target"}
    if tuple(source.input_shape) != tuple(dm.input_shape):  # scoring would need the source's data path
        return {"skipped": f"source input {list(source.input_shape)} ≠ target input {list(dm.input_shape)}"}
    return transferability(source, dm, max_samples=max_samples, seed=0)  # eval mode, no_grad: no BN drift
