"""Rebuild a finished run's source model, target model and target data from its run directory.

``results.json`` holds the resolved config; the source comes from the store entry named by
``source.key`` (``model.safetensors`` + ``config.json``) or from ``source.checkpoint``; the target
is ``strategy.build(source, target)`` overlaid with ``target.safetensors`` (all weights) or
``target_trainable.safetensors`` (only what trained; the rest is the source's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file
from torch import nn

from transfer_lab.analysis.collect import load
from transfer_lab.checkpoint import load_trainable
from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.builders import build_model, make_datamodule, without_weights
from transfer_lab.model_spec import build_model_from_spec
from transfer_lab.source_stage import checkpoint_source


@dataclass
class LoadedRun:
    """A finished run, rebuilt: ``source`` is None for runs without one (``scratch``)."""

    run_dir: Path
    results: dict[str, Any]
    cfg: DictConfig
    source: Classifier | None
    target: nn.Module
    target_dm: TransferDataModule


def read_results(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no results.json (not a finished run directory)")
    results = json.loads(path.read_text())
    if results.get("status") != "ok":
        raise ConfigError(f"{path}: status={results.get('status')!r}, not a finished run")
    return results


def find_runs(dirs: list[str | Path]) -> list[Path]:
    """Every finished run directory (an ``ok`` results.json with a test metric) under the given
    directories, sorted: the report's loader decides what counts."""
    return sorted({cell.path for d in dirs for cell in load(d)[0]})


def _locate(path: str, run_dir: Path) -> str:
    """Relative paths in a config are relative to where the run was launched: try the current
    directory first, then the run directory's ancestors (runs live under <root>/multirun/...)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return path
    for parent in run_dir.resolve().parents:
        if (parent / p).exists():
            return str(parent / p)
    return path


def _relocate_data(data_cfg: dict, run_dir: Path) -> dict:
    return {k: _locate(v, run_dir) if k.endswith("_file") and isinstance(v, str) else v
            for k, v in data_cfg.items()}


def load_source(results: dict, cfg: DictConfig, run_dir: Path,
                store_dir: str | Path | None = None) -> Classifier | None:
    src = results.get("source") or {}
    if not src.get("used"):
        return None
    if src.get("checkpoint"):
        return checkpoint_source(cfg, make_datamodule(cfg.source.data, cfg.seed, "source.data").prepare())[0]
    store = Path(_locate(str(store_dir or cfg.store_dir), run_dir))
    entry = store / src["key"]
    if not (entry / "model.safetensors").is_file():
        raise ConfigError(f"source store entry {entry} is missing (pass --store <store_dir>)")
    spec = json.loads((entry / "config.json").read_text())
    # a store entry's config came from a file: built only through the allow-listed factories
    model = build_model_from_spec(spec, f"source store entry {entry}")
    model.load_state_dict(load_file(str(entry / "model.safetensors")))
    return model.eval()


def load_run(run_dir: str | Path, store_dir: str | Path | None = None) -> LoadedRun:
    """Rebuild source, target model (with its trained weights) and target data of a run."""
    run_dir = Path(run_dir)
    results = read_results(run_dir)
    raw = results["config"]
    raw["target"]["data"] = _relocate_data(raw["target"]["data"], run_dir)
    raw["source"]["data"] = _relocate_data(raw["source"]["data"], run_dir)
    cfg = OmegaConf.create(raw)
    source = load_source(results, cfg, run_dir, store_dir)
    shape = tuple(source.input_shape) if source is not None else None
    model_cfg = cfg.target.get("model") or without_weights(cfg.source.model)
    dm = make_datamodule(cfg.target.data, cfg.seed, "target.data", default_shape=shape,
                         model_cfg=model_cfg).prepare()
    L.seed_everything(int(cfg.seed), verbose=False)
    target = build_model(model_cfg, dm)
    model = instantiate(cfg.strategy).build(source, target)
    weights = results.get("weights") or {}
    if weights.get("mode") == "full":
        model.load_state_dict(load_file(str(run_dir / weights["file"])))
    elif weights.get("mode") == "trainable":
        load_trainable(model, run_dir / weights["file"])
    else:
        raise ConfigError(f"{run_dir}: the run saved no target weights (target.save_weights=none)")
    return LoadedRun(run_dir, results, cfg, source, model.eval(), dm)
