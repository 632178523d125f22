"""The source-model store: one trained source per key, shared by every run that needs it.

An entry is a directory ``<store_dir>/<key>/`` holding ``model.safetensors``, ``config.json``
(everything needed to rebuild the model), ``metrics.json`` and, written last, ``manifest.json``
with each file's SHA-256. An entry without a valid manifest is incomplete and is retrained.
Entries are built in a temporary directory and renamed into place under a file lock, so
concurrent runs wanting one key train it once and nobody reads half an entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from transfer_lab.data.datamodule import ConfigError
from transfer_lab.io import atomic_write_json, sha256_file

FILES = ("model.safetensors", "config.json", "metrics.json")


def store_key(spec: dict[str, Any]) -> str:
    """Hash of everything that determines the source weights (canonical JSON → SHA-256)."""
    blob = json.dumps(spec, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


class SourceStore:
    """Directory of trained sources, keyed by ``store_key``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / key

    def is_valid(self, key: str) -> bool:
        d = self.entry(key)
        try:
            manifest = json.loads((d / "manifest.json").read_text())
            return all(sha256_file(d / f) == manifest["sha256"][f] for f in FILES)
        except (OSError, KeyError, ValueError):
            return False

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
        d = self.entry(key)
        return (load_file(d / "model.safetensors"), json.loads((d / "config.json").read_text()),
                json.loads((d / "metrics.json").read_text()))

    def save(self, key: str, state: dict[str, torch.Tensor], config: dict, metrics: dict) -> Path:
        """Write the entry into a temp dir beside it, then rename it into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      tmp / "model.safetensors")
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            atomic_write_json(tmp / "manifest.json", {
                "key": key, "created": time.time(),
                "sha256": {f: sha256_file(tmp / f) for f in FILES}})
            final = self.entry(key)
            if final.exists():  # an invalid leftover: replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_create(self, key: str, train: Callable[[], tuple[dict, dict, dict]]
                      ) -> tuple[dict[str, torch.Tensor], dict, dict, bool]:
        """Load the entry, or train it once under a lock. Returns ``(state, config, metrics, hit)``."""
        if self.is_valid(key):
            return (*self.load(key), True)
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.root / f"{key}.lock")):
            if self.is_valid(key):  # someone else trained it while we waited
                return (*self.load(key), True)
            state, config, metrics = train()
            self.save(key, state, config, metrics)
        return (*self.load(key), False)


# --- external sources and knowledge packages ---------------------------------------------------
def load_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, a knowledge package, or a Lightning/torch checkpoint.

    Pickled checkpoints are read with ``weights_only=True``: a file that would run code is refused.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"source.checkpoint={path}: no such file or directory")
    if p.is_dir() or p.suffix == ".zip":
        return read_package(p)[0]
    if p.suffix == ".safetensors":
        return load_file(str(p))
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling refusal becomes one clear line
        raise ConfigError(f"source.checkpoint={path}: refused to load ({type(e).__name__}: "
                          f"{str(e).splitlines()[0]}); only weights are accepted") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict):
        raise ConfigError(f"source.checkpoint={path}: not a state dict")
    return {k.removeprefix("model."): v for k, v in state.items()}


def export_package(store: SourceStore, key: str, out: str | Path) -> Path:
    """Write a portable knowledge package (zip): weights, the config that rebuilds the model,
    and a card with the source's metrics."""
    if not store.is_valid(key):
        raise ConfigError(f"store entry {key} under {store.root} is missing or incomplete")
    d, out = store.entry(key), Path(out)
    config = json.loads((d / "config.json").read_text())
    metrics = json.loads((d / "metrics.json").read_text())
    card = (f"# Source model {key}\n\nmodel: {config.get('model')}\ndata: {config.get('data')}\n"
            f"input shape: {config.get('input_shape')}, classes: {config.get('num_classes')}\n"
            f"metrics: {json.dumps(metrics)}\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(tmp, "w") as z:
        for f in (*FILES, "manifest.json"):
            z.write(d / f, f)
        z.writestr("CARD.md", card)
    os.replace(tmp, out)
    return out


def read_package(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Validate and read a knowledge package (zip or directory): checksums, then tensors."""
    path = Path(path)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        if path.is_dir():
            for f in (*FILES, "manifest.json"):
                if (path / f).exists():
                    shutil.copy(path / f, d / f)
        else:
            with zipfile.ZipFile(path) as z:
                for f in (*FILES, "manifest.json"):
                    if f in z.namelist():
                        z.extract(f, d)
        missing = [f for f in (*FILES, "manifest.json") if not (d / f).exists()]
        if missing:
            raise ConfigError(f"knowledge package {path}: missing {', '.join(missing)}")
        manifest = json.loads((d / "manifest.json").read_text())
        for f in FILES:
            if sha256_file(d / f) != manifest.get("sha256", {}).get(f):
                raise ConfigError(f"knowledge package {path}: checksum mismatch for {f}")
        return (load_file(str(d / "model.safetensors")), json.loads((d / "config.json").read_text()),
                json.loads((d / "metrics.json").read_text()))


def import_package(path: str | Path, store: SourceStore) -> str:
    state, config, metrics = read_package(path)
    key = config.get("key") or store_key(config)
    store.save(key, state, config, metrics)
    return key
