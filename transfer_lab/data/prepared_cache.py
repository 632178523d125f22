"""Prepared data reused within one process: the trials of a study (an Optuna sweep runs them one
after another in one process) load, subset, split and normalise the same data once.

``prepare_cached(dm)`` is ``dm.prepare()``, except that when an earlier module of the same class
was prepared from the same settings and the same input files (path, size, mtime), ``dm`` takes
that module's prepared state instead of loading: the tensors and arrays are shared (nothing
writes them: batches are gathered copies, ``setup`` moves them by copying), everything else is
copied, so each trial still has its own module (trainer, loaders, epoch, cached statistics).
Settings that only shape the loaders (batch sizes, loader, workers, augmentation) are not part
of the key: a search over the batch size still reuses the data.

A module whose class does not say which files it reads (``input_files`` returns None, the
default for subclasses) is prepared every time. The cache holds a few entries within a byte
budget, least recently used out first: ``TRANSFER_LAB_DATA_CACHE_MB`` (default 1024; 0 turns
it off).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError

MAX_ENTRIES = 8
DEFAULT_MB = 1024.0
# read only by the loaders and the batch transform, never by prepare(): outside the key, and a
# reused module keeps its own values
LOADER_ONLY = frozenset({"batch_size", "eval_batch_size", "loader", "num_workers", "device_resident",
                         "augment"})
# Lightning's and the run's own state, never the data's
RUNTIME = frozenset({"trainer", "_trainer", "_stats", "_minority", "_ready", "_log_hyperparams",
                     "prepare_data_per_node", "allow_zero_length_dataloader_with_multiple_devices"})

log = logging.getLogger("transfer_lab")
_entries: OrderedDict[tuple, tuple[dict[str, Any], int]] = OrderedDict()
counts = {"hits": 0, "misses": 0, "uncacheable": 0}


def budget_bytes() -> int:
    """The byte budget from ``TRANSFER_LAB_DATA_CACHE_MB`` (0: no reuse)."""
    raw = os.environ.get("TRANSFER_LAB_DATA_CACHE_MB", "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_MB
    except ValueError:
        mb = -1.0
    if not 0 <= mb < float("inf"):
        raise ConfigError(f"TRANSFER_LAB_DATA_CACHE_MB={raw}: expected megabytes ≥ 0 for the prepared data "
                          "reused within a process (0 turns the reuse off)")
    return int(mb * 2**20)


def clear() -> None:
    """Drop every entry and reset the counts (tests, benchmarks)."""
    _entries.clear()
    counts.update(hits=0, misses=0, uncacheable=0)


def prepare_cached(dm: TransferDataModule) -> TransferDataModule:
    """``dm.prepare()``, served from an earlier identical module's prepared state when there is one."""
    budget = budget_bytes()
    if budget <= 0 or dm._ready:
        return dm.prepare()
    key = cache_key(dm)
    if key is None:
        counts["uncacheable"] += 1
        return dm.prepare()
    if key in _entries:
        _entries.move_to_end(key)
        state, _ = _entries[key]
        dm.__dict__.update(_copy(state))
        counts["hits"] += 1
        log.info("%s: reusing the data an earlier run of this process prepared", dm.key)
        return dm
    before = dict(vars(dm))
    dm.prepare()
    state = {k: v for k, v in vars(dm).items()
             if k not in RUNTIME and k not in LOADER_ONLY and (k not in before or before[k] is not v)}
    state["_ready"] = True
    size = sum(_nbytes(v) for v in state.values())
    counts["misses"] += 1
    if size <= budget:
        _entries[key] = (_copy(state), size)
        while len(_entries) > MAX_ENTRIES or sum(s for _, s in _entries.values()) > budget:
            _entries.popitem(last=False)
    return dm


def cache_key(dm: TransferDataModule) -> tuple | None:
    """What determines ``dm``'s prepared data: its class (and its loading code, so a patched
    loader is not served an old result), its settings and its input files; None when the class
    does not name its inputs."""
    files = dm.input_files()
    if files is None:
        return None
    settings = {k: v for k, v in vars(dm).items() if k not in RUNTIME and k not in LOADER_ONLY}
    text = json.dumps([settings, [file_identity(Path(f)) for f in files]], sort_keys=True, default=repr)
    cls = type(dm)
    return cls, cls.prepare, cls.load_arrays, hashlib.sha256(text.encode()).hexdigest()


def file_identity(path: Path) -> list:
    """A file's (path, size, mtime); a folder's for every file under it; a missing path as such."""
    if path.is_file():
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return [[str(p), st.st_size, st.st_mtime_ns] for p in sorted(path.resolve().rglob("*"))
                if p.is_file() and (st := p.stat())]
    return [str(path), "missing"]


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    return v.nbytes if isinstance(v, np.ndarray) else 0


def _copy(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors and arrays shared, the rest (lists, counts' containers, stand-ins) copied."""
    memo = {id(v): v for v in state.values() if isinstance(v, (torch.Tensor, np.ndarray))}
    return {k: copy.deepcopy(v, memo) for k, v in state.items()}
