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
from transfer_lab.builders import (build_model, make_module, make_trainer, scheduler_of, task_of,
                                   without_weights)
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError
from transfer_lab.io import read_weights, sha256_file
from transfer_lab.models.classifier import Classifier
from transfer_lab.models.weights import model_data_config
from transfer_lab.module import NonFiniteLossError
from transfer_lab.store import SourceStore
from transfer_lab.package import load_state_dict, store_key
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
    if dm is None:  # data=none: the pretrained model as it is (built by run.prepare)
        if model is None:
            raise ValueError("source_stage: a source without data needs its model (pretrained_model)")
        return pretrained_source(cfg, model)
    # the stored or external state dict replaces every weight: the init file is not read again
    if model is None:
        model = build_model(without_weights(cfg.source.model), dm, key="source.model")
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
    return model, {"used": True, "key": key, "cache_hit": hit, **metrics, "data": normalization(dm),
                   "load_or_train_s": round(time.perf_counter() - t0, 3)}


def normalization(dm: TransferDataModule) -> dict:
    """Which statistics a side's inputs were normalised with (``dataset`` or ``model``)."""
    summary = dm.summary()
    return {k: summary[k] for k in ("normalization", "mean", "std") if k in summary}


# --- data=none: a pretrained model used as it is ---------------------------------------------
def has_data(node: Any) -> bool:
    """False for ``data=none`` (an empty node: nothing to instantiate)."""
    return isinstance(node, (dict, DictConfig)) and bool(node.get("_target_"))


def pretrained_model(cfg: DictConfig, input_shape: tuple[int, int, int]) -> Classifier:
    """The source of ``data=none``: ``source.model`` with its weights file, or rebuilt empty and
    loaded from ``source.checkpoint``, on the target's input, with the classes of the file's
    classifier (so LEEP and the strategies see the model as it is)."""
    ckpt, model_cfg = cfg.source.get("checkpoint"), cfg.source.model
    if not ckpt and model_cfg.get("weights") is None and model_cfg.get("checkpoint") is None:
        raise ConfigError("source.data=none: the source is a pretrained model used as it is, but "
                          "source.model.weights is null and source.checkpoint is unset; give "
                          "source.model.weights=<file> (or cache), source.checkpoint=<file>, or "
                          "source data to train on")
    if ckpt:
        model_cfg = without_weights(model_cfg)
    probe = build_model(model_cfg, input_shape=input_shape, num_classes=1, key="source.model")
    path = ckpt or getattr(probe, "weights_file", None)
    if path is None:
        raise ConfigError(f"source.data=none: {model_cfg._target_} did not load a local weights file "
                          "(named weights are a download); give source.model.weights=<file>")
    state = load_state_dict(ckpt) if ckpt else read_weights(path, "source.model.weights")
    k = file_classes(probe, state, bool(ckpt))
    model = build_model(model_cfg, input_shape=input_shape, num_classes=k, key="source.model")
    if ckpt:
        load_into(model, state, f"source.checkpoint={ckpt}")
    model.weights_file = str(path)
    return model


def file_classes(probe: Classifier, state: dict, ours: bool) -> int:
    """Outputs of the weights file's classifier; else those timm's ``pretrained_cfg`` names."""
    if ours:  # our own Classifier's state dict: the head's last Linear
        last = [n for n, m in probe.head.named_modules() if isinstance(m, torch.nn.Linear)][-1]
        keys = [".".join(filter(None, ("head", last, "weight")))]
    elif getattr(probe, "timm_classifier", None):
        keys = [f"{probe.timm_classifier}.weight"]
    else:  # torchvision: the one 2-D weight that reads the backbone's features and is not in it
        inside = {k for k in probe.backbone.state_dict()}
        keys = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2
                and v.shape[1] == probe.feature_dim and k not in inside]
    found = {int(state[k].shape[0]) for k in keys if k in state and state[k].ndim == 2}
    if len(found) == 1:
        return found.pop()
    if getattr(probe, "timm_name", None):  # the file has no classifier: timm's count for the name
        from timm.models import get_pretrained_cfg

        declared = getattr(get_pretrained_cfg(probe.timm_name), "num_classes", None)
        if declared:
            return int(declared)
    raise ConfigError(f"source.data=none: cannot tell how many classes the classifier in "
                      f"{getattr(probe, 'weights_file', None) or 'source.checkpoint'} has "
                      f"(looked for {', '.join(keys) or 'a 2-D weight after the backbone'})")


def pretrained_source(cfg: DictConfig, model: Classifier) -> tuple[Classifier, dict]:
    """The store keys a pretrained source by its file's content (sha256), not its path: the same
    weights moved or renamed are the same source; new weights under an old name are not."""
    path = Path(model.weights_file)
    digest = sha256_file(path)
    spec = {"pretrained_sha256": digest, "input_shape": list(model.input_shape),
            "num_classes": model.num_classes,
            # rebuilt empty from the store (analysis, packages): the entry holds every weight
            "model": OmegaConf.to_container(without_weights(cfg.source.model), resolve=True)}
    key = store_key(spec)
    state, _, _, hit = SourceStore(cfg.store_dir).get_or_create(
        key, lambda: (model.state_dict(), {**spec, "key": key}, {}))
    model.load_state_dict(state)
    declared = model_data_config(model)
    data = ({"normalization": "model", "mean": declared["mean"], "std": declared["std"]} if declared
            else {"normalization": None})
    return model, {"used": True, "pretrained": True, "weights_file": str(path), "sha256": digest,
                   "key": key, "cache_hit": hit, "num_classes": model.num_classes, "data": data}


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
    if model is None:
        model = build_model(without_weights(cfg.source.model), dm, key="source.model")
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
