"""Atomic file writes: a crash leaves either the old file or the new one, never half of one.

Every writer goes through ``atomic_write_bytes``: the bytes go to a uniquely named temp file in
the destination directory (same filesystem, so the rename is atomic), are flushed and fsynced,
and the temp file is renamed over the destination; the directory is fsynced too, so the rename
itself survives a power cut. Concurrent writers of one path never share a temp file: the last
rename wins and readers see one complete version.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch stays a lazy import: report tools use this module without it
    import torch


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temp file + rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_save_safetensors(path: str | Path, tensors: dict[str, torch.Tensor],
                            metadata: dict[str, str] | None = None) -> Path:
    """Serialise tensors to safetensors in memory, then write them atomically."""
    from safetensors.torch import save

    blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, blob)
    return Path(path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- reading weights from files that come from outside: tensors only, nothing that runs code ---
def load_safetensors_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` state dict; a file that is not one fails with one line."""
    from safetensors.torch import load_file

    from transfer_lab.errors import ConfigError

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 — SafetensorError and friends
        raise ConfigError(f"{path}: not a readable .safetensors file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None


def _refusal(e: Exception) -> str:
    """The informative line of torch's weights-only refusal (it is many lines long)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Unsupported") or "Unsupported global" in ln:
            return ln.removeprefix("WeightsUnpickler error: ")
    return lines[0] if lines else type(e).__name__


def read_weights(path: str | Path, key: str = "weights") -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a pickled torch/Lightning checkpoint (``.pth``,
    ``.pt``, ``.bin``, ``.ckpt``), read with ``weights_only=True``: a file that would run code (or
    build any object but tensors and containers) is refused and nothing in it executes. A
    Lightning checkpoint's ``state_dict`` is unwrapped and its ``model.`` prefix dropped.
    ``key`` names the config key in error messages."""
    import torch

    from transfer_lab.errors import ConfigError

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file")
    if p.suffix == ".safetensors":
        return load_safetensors_file(p)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 — any unpickling refusal becomes one clear line
        raise ConfigError(f"{key}={path}: refused to load ({type(e).__name__}: "
                          f"{_refusal(e)}); only weights are accepted — prefer .safetensors") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}={path}: not a state dict (name → tensor)")
    return {k.removeprefix("model."): v for k, v in state.items()}
