"""The results.json contract shared by the run (writer) and the tools (readers): which config keys
do not change a result, the config hash that resuming compares, and whether a cell is done."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from transfer_lab.package import store_key

# keys that change how a run is executed, logged or stored, not its result: resuming and the
# report's grouping ignore them
NON_RESULT_KEYS = ("resume", "logger", "store_dir", "data_dir", "transferability", "optimized_metric",
                  "vectorize_seeds", "vectorize_mode")


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


class RunFailed(RuntimeError):
    """A run that started and failed; its ``results.json`` says ``status: failed`` and why."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message`` — what the command prints and results.json keeps."""
    text = (str(exc).strip().splitlines() or [""])[0]
    if type(exc).__name__ == "ConfigError":  # its message already names the key and the fix
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def log_traceback(exc: BaseException, where: str) -> None:
    """The full traceback to the run's log file (Hydra's ``train.log``) only, not the console."""
    import logging

    files = [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]
    trace = logging.getLogger("transfer_lab.trace")
    trace.propagate, trace.handlers = False, files
    if files:
        trace.error("%s failed", where, exc_info=(type(exc), exc, exc.__traceback__))


def record_failure(out_dir: str | Path, results: dict, stage: str, exc: BaseException) -> str:
    """Write ``results.json`` with ``status: failed``, the ``stage`` and a one-line ``error``;
    returns that line. A store or output directory that cannot be written is reported, not raised."""
    line = one_line(exc)
    results.update(status="failed", stage=stage, error=line)
    results.pop("metrics", None)  # no numbers from a broken run reach a table
    log_traceback(exc, f"{stage} stage")
    try:
        write_results(out_dir, results)
    except OSError as e:
        line += f" (and results.json could not be written: {one_line(e)})"
    return line
