"""The source-model store: one trained source per key, shared by every run that needs it.

An entry is a directory ``<store_dir>/<key>/`` holding ``model.safetensors``, ``config.json``
(everything needed to rebuild the model), ``metrics.json`` and, written last, ``manifest.json``
with each file's SHA-256. An entry without a valid manifest, or whose bytes do not hash to it,
is incomplete and is retrained, never loaded. Entries are built in a temporary directory and
renamed into place under a file lock, so concurrent runs (processes) wanting one key train it
once and nobody reads half an entry. Loading verifies the very bytes it parses, so a reader
racing a writer sees the old entry or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from transfer_lab.errors import ConfigError
from transfer_lab.io import atomic_write_bytes, atomic_write_json, fsync_dir, read_weights, sha256_bytes
from transfer_lab.validate import validate_package

FILES = ("model.safetensors", "config.json", "metrics.json")
PACKAGE_FILES = (*FILES, "manifest.json")
KEY_RE = re.compile(r"[0-9a-f]{8,64}")


class CorruptEntry(Exception):
    """A store entry that is missing files or fails its checksums (retrained, not loaded)."""


def store_key(spec: dict[str, Any]) -> str:
    """Hash of everything that determines the source weights (canonical JSON → SHA-256)."""
    blob = json.dumps(spec, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _check_key(key: str) -> str:
    # a key names a directory: anything but hex could climb out of the store (``../..``)
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ConfigError(f"store key {key!r}: expected 8-64 lowercase hex digits")
    return key


def _parse_entry(blobs: dict[str, bytes], where: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Checksums (against the manifest among ``blobs``), then tensors and JSON."""
    try:
        manifest = json.loads(blobs["manifest.json"])
        sums = manifest["sha256"]
        for f in FILES:
            if sha256_bytes(blobs[f]) != sums[f]:
                raise CorruptEntry(f"{where}: checksum mismatch for {f}")
        return (load_safetensors_bytes(blobs["model.safetensors"]),
                json.loads(blobs["config.json"]), json.loads(blobs["metrics.json"]))
    except CorruptEntry:
        raise
    except Exception as e:  # noqa: BLE001 — missing keys, bad JSON, bad header: all "corrupt"
        raise CorruptEntry(f"{where}: unreadable ({type(e).__name__}: {e})") from None


class SourceStore:
    """Directory of trained sources, keyed by ``store_key``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def entry(self, key: str) -> Path:
        return self.root / _check_key(key)

    def lock(self, key: str) -> FileLock:
        self.root.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.root / f"{_check_key(key)}.lock"))

    def _read(self, key: str) -> dict[str, bytes]:
        d = self.entry(key)
        try:
            return {f: (d / f).read_bytes() for f in PACKAGE_FILES}
        except OSError as e:
            raise CorruptEntry(f"store entry {d}: {type(e).__name__}: {e.filename}") from None

    def is_valid(self, key: str) -> bool:
        try:
            self.load(key)
            return True
        except CorruptEntry:
            return False

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """``(state, config, metrics)`` of a complete entry; ``CorruptEntry`` otherwise."""
        blobs = self._read(key)
        state, config, metrics = _parse_entry(blobs, f"store entry {self.entry(key)}")
        if json.loads(blobs["manifest.json"]).get("key") != key:
            raise CorruptEntry(f"store entry {self.entry(key)}: manifest names another key")
        return state, config, metrics

    def save(self, key: str, state: dict[str, torch.Tensor], config: dict, metrics: dict) -> Path:
        """Write the entry into a temp dir beside it, then rename it into place.

        Callers racing for one key hold ``self.lock(key)`` (``get_or_create`` does).
        """
        final = self.entry(key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root))
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      str(tmp / "model.safetensors"))
            (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
            for f in FILES:  # data first on disk, then the manifest that vouches for it
                with open(tmp / f, "rb") as fh:
                    os.fsync(fh.fileno())
            atomic_write_json(tmp / "manifest.json", {
                "key": key, "created": time.time(),
                "sha256": {f: sha256_bytes((tmp / f).read_bytes()) for f in FILES}})
            old = None
            if final.exists():  # an invalid leftover: move it aside, never delete before replacing
                old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=self.root))
                os.replace(final, old / "entry")
            os.replace(tmp, final)
            fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            return final
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_create(self, key: str, train: Callable[[], tuple[dict, dict, dict]]
                      ) -> tuple[dict[str, torch.Tensor], dict, dict, bool]:
        """Load the entry, or train it once under a lock. Returns ``(state, config, metrics, hit)``.

        Processes asking for one key at once: the first trains, the others wait on the lock and
        then load what it saved. A corrupt entry is retrained, not loaded.
        """
        try:
            return (*self.load(key), True)
        except CorruptEntry:
            pass
        with self.lock(key):
            try:  # someone else trained it while we waited
                return (*self.load(key), True)
            except CorruptEntry:
                pass
            state, config, metrics = train()
            self.save(key, state, config, metrics)
            # return what is on disk, so the trainer and the waiters hold identical tensors
            return (*self.load(key), False)


# --- external sources and knowledge packages ---------------------------------------------------
def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, a knowledge package, or a Lightning/torch checkpoint.

    Pickled checkpoints are read with ``weights_only=True``: a file that would run code (or
    build any object but tensors and containers) is refused, and nothing in it executes.
    """
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"source.checkpoint={path}: no such file or directory")
    if p.is_dir() or p.suffix == ".zip":
        return read_package(p)[0]
    return read_weights(p, "source.checkpoint")


def export_package(store: SourceStore, key: str, out: str | Path) -> Path:
    """Write a portable knowledge package (zip): weights, the config that rebuilds the model,
    and a card with the source's metrics."""
    try:
        blobs = store._read(key)
        _, config, metrics = _parse_entry(blobs, f"store entry {store.entry(key)}")
    except CorruptEntry:
        raise ConfigError(f"store entry {key} under {store.root} is missing or incomplete") from None
    card = (f"# Source model {key}\n\nmodel: {config.get('model')}\ndata: {config.get('data')}\n"
            f"input shape: {config.get('input_shape')}, classes: {config.get('num_classes')}\n"
            f"metrics: {json.dumps(metrics)}\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in PACKAGE_FILES:
            z.writestr(f, blobs[f])
        z.writestr("CARD.md", card)
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def _package_blobs(path: Path) -> dict[str, bytes]:
    if path.is_dir():
        return {f: (path / f).read_bytes() for f in PACKAGE_FILES if (path / f).is_file()}
    try:
        with zipfile.ZipFile(path) as z:
            # only the fixed member names are read (no extraction: no path tricks)
            return {f: z.read(f) for f in PACKAGE_FILES if f in z.namelist()}
    except (zipfile.BadZipFile, OSError) as e:
        raise ConfigError(f"knowledge package {path}: not a readable zip ({e})") from None


def read_package(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """Validate and read a knowledge package (zip or directory).

    Checked in order, each failure one ``ConfigError`` line: all files present, SHA-256 of each
    against the manifest, the key against the hash of the config, the model config names a
    ``transfer_lab.models`` builder, and the tensors' keys, shapes and dtypes against the model
    that config rebuilds.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"knowledge package {path}: no such file or directory")
    blobs = _package_blobs(path)
    missing = [f for f in PACKAGE_FILES if f not in blobs]
    if missing:
        raise ConfigError(f"knowledge package {path}: missing {', '.join(missing)}")
    try:
        state, config, metrics = _parse_entry(blobs, f"knowledge package {path}")
    except CorruptEntry as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if not isinstance(config, dict) or not isinstance(metrics, dict):
        raise ConfigError(f"knowledge package {path}: config.json and metrics.json must be objects")
    key = config.get("key")
    if key is not None:
        spec = {k: v for k, v in config.items() if k != "key"}
        if not isinstance(key, str) or store_key(spec) != key:
            raise ConfigError(f"knowledge package {path}: key {key!r} is not the hash of its "
                              "config (edited or forged)")
    validate_package(state, config, f"knowledge package {path}")
    return state, config, metrics


def import_package(path: str | Path, store: SourceStore) -> str:
    """Validate a package and add it to ``store`` under its key (returned)."""
    state, config, metrics = read_package(path)
    key = config.get("key") or store_key(config)
    with store.lock(key):
        store.save(key, state, config, metrics)
    return key
