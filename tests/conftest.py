"""Shared test helpers: compose the real Hydra config with tiny, offline settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_DATA = Path(os.environ.get("TRANSFER_LAB_DATA", ROOT.parent / "shared" / "data"))
STRATEGIES = sorted(p.stem for p in (CONF / "strategy").glob("*.yaml"))

# tiny, offline, CPU: synthetic data, a small CNN, two epochs per stage
TINY = ["data@source.data=synthetic", "data@target.data=synthetic", "model@source.model=tiny_cnn",
        "source.epochs=2", "target.epochs=2", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false"]


def compose_cfg(*overrides: str, store: Path | str | None = None, tiny: bool = True) -> DictConfig:
    """The config ``python -m transfer_lab.train <overrides>`` would run (Hydra's compose API)."""
    extra = list(TINY) if tiny else []
    if store is not None:
        extra.append(f"store_dir={store}")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[*extra, *overrides])


def needs_shared(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} not present (the real data arrays live in ../shared/data)")
    return path
