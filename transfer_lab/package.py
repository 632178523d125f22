"""Knowledge packages: a trained source as a portable file, read as data and within bounds.

A package (a zip, or a directory with the same files — a store entry is one) holds
``model.safetensors``, ``config.json`` (what rebuilds the model), ``metrics.json`` and
``manifest.json`` (each file's SHA-256, and the key). Reading one never runs code and never
takes more memory than the model it describes: members are read in chunks, hashed as they
stream (1 MiB chunks) and cut off at a cap — ``SMALL_CAPS`` for the JSON files and the card
(64 KiB manifest, 1 MiB config and metrics), and for the weights the size of the model its
config describes (parameters × 4 bytes × ``WEIGHT_MARGIN`` + header slack); a zip whose declared
sizes exceed the caps is refused before anything is decompressed; at most ``MAX_ENTRIES`` (16)
entries; symlinks, zip directories and special files are refused. The config is
parsed as plain JSON and its model built only by an allow-listed factory
(``transfer_lab.model_spec``); the tensors must then match that model exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import stat
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.io import atomic_write_bytes, read_weights
from transfer_lab.model_spec import MAX_MODEL_BYTES, build_model_from_spec, parse_config
from transfer_lab.validate import check_state

if TYPE_CHECKING:
    from transfer_lab.store import SourceStore

FILES = ("model.safetensors", "config.json", "metrics.json")
PACKAGE_FILES = (*FILES, "manifest.json")
#: the most bytes each small member may hold (a config is a few kB; CARD.md is never read)
SMALL_CAPS = {"manifest.json": 64 << 10, "config.json": 1 << 20, "metrics.json": 1 << 20,
              "CARD.md": 64 << 10}
MAX_ENTRIES = 16
#: float32 weights are exactly 4 bytes an element (dtypes are checked against the model after
#: reading): 2× leaves room for a float64 tensor to be named in the error, nothing more
WEIGHT_MARGIN = 2
#: safetensors' JSON header: names, dtypes, shapes and offsets, well under 1 kB a tensor
HEADER_SLACK, SLACK_PER_TENSOR = 64 << 10, 1 << 10
CHUNK = 1 << 20


def store_key(spec: dict[str, Any]) -> str:
    """Hash of everything that determines the source weights (canonical JSON → SHA-256): the
    key of a store entry, which a package's config must hash to."""
    blob = json.dumps(spec, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class Entry:
    """A verified package or store entry: the raw bytes and what they parse to."""

    blobs: dict[str, bytes]
    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    metrics: dict[str, Any]
    manifest: dict[str, Any]


# --- bounded reading of members -------------------------------------------------------------------
class _Members:
    """The members of a zip or a directory by name, with their declared sizes."""

    def __init__(self, path: Path, where: str, z: zipfile.ZipFile | None) -> None:
        self.path, self.where, self.zip = path, where, z
        self.sizes = self._zip_sizes() if z is not None else self._dir_sizes()

    def _zip_sizes(self) -> dict[str, int]:
        infos = self.zip.infolist()
        if len(infos) > MAX_ENTRIES:
            raise ConfigError(f"{self.where}: {len(infos)} entries; a package holds at most {MAX_ENTRIES}")
        names = [i.filename for i in infos]
        if len(set(names)) != len(names):
            raise ConfigError(f"{self.where}: a member name appears twice; refused")
        for i in infos:
            if stat.S_ISLNK(i.external_attr >> 16) or i.is_dir():
                raise ConfigError(f"{self.where}: member {i.filename} is a symlink or directory; refused")
        return {i.filename: i.file_size for i in infos}

    def _dir_sizes(self) -> dict[str, int]:
        sizes: dict[str, int] = {}
        try:
            listing = os.scandir(self.path)
        except OSError as e:
            raise ConfigError(f"{self.where}: cannot list the directory ({e.strerror})") from None
        with listing as it:
            for n, e in enumerate(it):
                if n >= MAX_ENTRIES:
                    raise ConfigError(f"{self.where}: more than {MAX_ENTRIES} entries; refused")
                st = e.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode) or not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a special file"
                    raise ConfigError(f"{self.where}: {e.name} is {kind}; a package holds regular files only")
                if stat.S_ISREG(st.st_mode):
                    sizes[e.name] = st.st_size
        return sizes

    @contextlib.contextmanager
    def _open(self, name: str) -> Iterator[IO[bytes]]:
        if self.zip is not None:
            with self.zip.open(name) as f:
                yield f
            return
        # O_NOFOLLOW: a file swapped for a symlink after the listing is refused, not followed;
        # O_NONBLOCK: a FIFO swapped in does not hang the open
        fd = os.open(self.path / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ConfigError(f"{self.where}: {name} is not a regular file; refused")
            yield f

    def read(self, name: str, cap: int) -> tuple[bytes, str]:
        """The member's bytes and SHA-256, streamed in chunks and cut off past ``cap``."""
        if self.sizes[name] > cap:
            raise ConfigError(f"{self.where}: {name} declares {self.sizes[name]} bytes, more than "
                              f"the {cap} it can need; refused")
        h, buf = hashlib.sha256(), io.BytesIO()
        try:
            with self._open(name) as f:
                while chunk := f.read(CHUNK):
                    if buf.tell() + len(chunk) > cap:
                        raise ConfigError(f"{self.where}: {name} unpacks to more than the {cap} "
                                          "bytes it can need; refused")
                    h.update(chunk)
                    buf.write(chunk)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 — bad CRC, zlib/lzma errors, encryption, I/O: one line
            raise ConfigError(f"{self.where}: {name} is unreadable ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''})") from None
        return buf.getvalue(), h.hexdigest()


@contextlib.contextmanager
def _members(path: Path, where: str) -> Iterator[_Members]:
    if path.is_symlink():
        raise ConfigError(f"{where}: is a symlink; give the real path")
    if path.is_dir():
        yield _Members(path, where, None)
        return
    try:
        z = zipfile.ZipFile(path)
    except Exception as e:  # noqa: BLE001 — BadZipFile, OSError, and zipfile's odder refusals
        raise ConfigError(f"{where}: not a readable zip ({str(e).splitlines()[0] if str(e) else e!r})") from None
    with z:
        yield _Members(path, where, z)


# --- verification ------------------------------------------------------------------------------------
def _json_object(blob: bytes, name: str, where: str) -> dict[str, Any]:
    try:
        obj = json.loads(blob)
    except (ValueError, RecursionError):
        raise ConfigError(f"{where}: {name} is not valid JSON") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: {name} must be a JSON object")
    return obj


def _weights_cap(config: dict[str, Any], where: str, strict: bool) -> tuple[int, nn.Module | None]:
    """The most bytes ``model.safetensors`` can need, from the model the config describes.
    ``strict=False`` (store entries, whose model may be the user's own, never built from the
    file): a config naming no allow-listed model gets the ceiling ``MAX_MODEL_BYTES``."""
    try:
        reference = build_model_from_spec(config, where, device="meta")
    except ConfigError:
        if strict:
            raise
        return MAX_MODEL_BYTES, None
    tensors = reference.state_dict()
    numel = sum(t.numel() for t in tensors.values())
    return numel * 4 * WEIGHT_MARGIN + HEADER_SLACK + SLACK_PER_TENSOR * len(tensors), reference


def read_entry(path: str | Path, where: str, *, strict: bool = True) -> Entry:
    """Read and verify a package or store entry, every failure one ``ConfigError`` line.

    In order: member count and kinds, the files present, the manifest, each file's SHA-256
    against it (hashed while streaming), config.json as data (``parse_config``), the weights'
    size against the model the config describes, and — ``strict`` — the tensors' keys, shapes
    and dtypes against that model.
    """
    path = Path(path)
    with _members(path, where) as m:
        missing = [f for f in PACKAGE_FILES if f not in m.sizes]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        blobs, sums = {}, {}
        for f in ("manifest.json", "config.json", "metrics.json"):
            blobs[f], sums[f] = m.read(f, SMALL_CAPS[f])
        manifest = _json_object(blobs["manifest.json"], "manifest.json", where)
        declared = manifest.get("sha256")
        if not isinstance(declared, dict):
            raise ConfigError(f"{where}: manifest.json has no sha256 table")
        _check_sum(declared, sums, "config.json", where)
        config = parse_config(blobs["config.json"], where, strict=strict)
        cap, reference = _weights_cap(config, where, strict)
        blobs["model.safetensors"], sums["model.safetensors"] = m.read("model.safetensors", cap)
        total = sum(m.sizes.values())  # members never read (CARD.md, extras) count here too
        if total > cap + sum(SMALL_CAPS.values()):
            raise ConfigError(f"{where}: members declare {total} bytes in all, more than the model "
                              "the config describes can need; refused")
    for f in ("model.safetensors", "metrics.json"):
        _check_sum(declared, sums, f, where)
    metrics = _json_object(blobs["metrics.json"], "metrics.json", where)
    state = _tensors(blobs["model.safetensors"], where)
    if reference is not None and strict:
        check_state(state, reference.state_dict(), where)
    return Entry(blobs, state, config, metrics, manifest)


def _check_sum(declared: dict, sums: dict[str, str], name: str, where: str) -> None:
    if declared.get(name) != sums[name]:
        raise ConfigError(f"{where}: checksum mismatch for {name}")


def _tensors(blob: bytes, where: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(blob)
    except Exception as e:  # noqa: BLE001 — SafetensorError and friends: a bad header
        raise ConfigError(f"{where}: model.safetensors is unreadable ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


# --- packages ------------------------------------------------------------------------------------------
def read_package(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict]:
    """``(state, config, metrics)`` of a knowledge package (zip or directory), verified by
    ``read_entry`` and its key checked against the hash of its config."""
    path = Path(path)
    where = f"knowledge package {path}"
    if not path.exists():
        raise ConfigError(f"{where}: no such file or directory")
    entry = read_entry(path, where)
    key = entry.config.get("key")
    if key is not None:
        spec = {k: v for k, v in entry.config.items() if k != "key"}
        if not isinstance(key, str) or store_key(spec) != key:
            raise ConfigError(f"{where}: key {key!r} is not the hash of its config (edited or forged)")
    return entry.state, entry.config, entry.metrics


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, a knowledge package, or a weights-only torch/Lightning
    checkpoint (``io.read_weights``): what ``source.checkpoint`` names."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"source.checkpoint={path}: no such file or directory")
    if p.is_dir() or p.suffix == ".zip":
        return read_package(p)[0]
    return read_weights(p, "source.checkpoint")


def export_package(store: SourceStore, key: str, out: str | Path) -> Path:
    """Write a store entry as a knowledge package (zip): weights, the config that rebuilds the
    model, metrics, and a card. The entry is read by the rules an import applies, so a package
    that could not be imported is never written."""
    entry_dir = store.entry(key)
    where = f"store entry {entry_dir}"
    if not entry_dir.is_dir():
        raise ConfigError(f"{where}: missing (no such entry under {store.root})")
    entry = read_entry(entry_dir, where)
    config, metrics = entry.config, entry.metrics
    card = (f"# Source model {key}\n\nmodel: {config.get('model')}\ndata: {config.get('data')}\n"
            f"input shape: {config.get('input_shape')}, classes: {config.get('num_classes')}\n"
            f"metrics: {json.dumps(metrics)}\n")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for f in PACKAGE_FILES:
            z.writestr(f, entry.blobs[f])
        z.writestr("CARD.md", card[:SMALL_CAPS["CARD.md"]])
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    return out


def import_package(path: str | Path, store: SourceStore) -> str:
    """Verify a package (``read_package``) and add it to ``store`` under its key (returned)."""
    state, config, metrics = read_package(path)
    key = config.get("key") or store_key(config)
    with store.lock(key):
        store.save(key, state, config, metrics)
    return key
