"""The results.json contract shared by the run (writer) and the tools (readers): which config keys
do not change a result, the config hash that resuming compares, and whether a cell is done."""

from __future__ import annotations

import json
from pathlib import Path

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
