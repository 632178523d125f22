"""The results.json contract shared by the run (writer) and the tools (readers): which config keys
do not change a result, the config hash that resuming compares, and whether a cell is done."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from transfer_lab.store import store_key

# keys that change how a run is executed, logged or stored, not its result: resuming and the
# report's grouping ignore them
NON_RESULT_KEYS = ("resume", "logger", "store_dir", "data_dir", "transferability")


def config_hash(cfg: DictConfig | dict) -> str:
    """Hash of the resolved config minus the keys that do not change a result (``NON_RESULT_KEYS``)."""
    c = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    return store_key({k: v for k, v in c.items() if k not in NON_RESULT_KEYS})


def completed(cfg: DictConfig, out_dir: str | Path) -> dict | None:
    """The results of ``out_dir`` if it already holds a finished run of this same config, else None.

    Sweep cells are skipped on this (``resume=false`` turns it off): the cell directory must be the
    same, so sweeps meant to be resumed need a fixed ``hydra.sweep.dir`` (the experiment presets set one).
    """
    if not cfg.get("resume", True):
        return None
    try:
        res = json.loads((Path(out_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    want = config_hash(cfg)
    same = want in (res.get("config_hash"), config_hash(res.get("config") or {}))
    return res if res.get("status") == "ok" and same else None


def environment(threads: int | None = None) -> dict:
    """Versions, device, git revision and the CPU thread count: bit-equal results need the same
    thread count (reductions split differently), so it is part of what a result records."""
    import platform
    import subprocess

    import lightning as L
    import torch

    import transfer_lab

    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "lightning": L.__version__, "transfer_lab": transfer_lab.__version__,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "platform": platform.platform(), "git": rev,
            "threads": torch.get_num_threads(), "job_threads": threads}


def save_weights(model: torch.nn.Module, out_dir: Path, mode: str, source_key: str | None) -> dict:
    """``auto``: only what trained when anything is frozen (the rest is the source's), else all."""
    from transfer_lab.checkpoint import save_trainable
    from transfer_lab.io import atomic_save_safetensors

    frozen = any(not p.requires_grad for p in model.parameters())
    if mode == "none":
        return {"mode": "none"}
    if mode == "trainable" or (mode == "auto" and frozen):
        path = save_trainable(model, out_dir / "target_trainable.safetensors", source_key)
        return {"mode": "trainable", "file": path.name, "source_key": source_key}
    path = atomic_save_safetensors(out_dir / "target.safetensors", model.state_dict())
    return {"mode": "full", "file": path.name, "source_key": source_key}


def write_results(out_dir: str | Path, results: dict) -> None:
    """``<out_dir>/results.json``, atomically (a crash leaves the old file or the new one)."""
    from transfer_lab.io import atomic_write_json

    atomic_write_json(Path(out_dir) / "results.json", results)
