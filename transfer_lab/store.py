"""The source-model store: one trained source per key, shared by every run that needs it.

An entry is a directory ``<store_dir>/<key>/`` in the knowledge-package layout
(``transfer_lab.package``): ``model.safetensors``, ``config.json``, ``metrics.json`` and, written
last, ``manifest.json`` with each file's SHA-256. It is read by the same bounded, no-code rules
as a package from outside (a shared store is written by other people too); an entry that fails
any check is retrained, never loaded, and the log says which check failed. Entries are built in
a temporary directory ``.<key>.<random>/`` and renamed into place under a file lock, so
concurrent runs wanting one key train it once and nobody reads half an entry. The lock holder
records its pid, host and start time beside the lock, so a waiter can say whom it waits for; the
wait is logged periodically and ends after ``lock_timeout_s``. Temp directories left by a killed
``save`` are swept once they are old and unlocked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save_file

from transfer_lab.errors import ConfigError
from transfer_lab.io import atomic_write_json, fsync_dir, sha256_file
from transfer_lab.package import FILES, read_entry

log = logging.getLogger(__name__)
KEY_RE = re.compile(r"[0-9a-f]{8,64}")
#: ``tempfile.mkdtemp`` names of ``save``: ``.<key>.<8 chars>`` and ``.<key>.old.<8 chars>``
TEMP_RE = re.compile(r"\.([0-9a-f]{8,64})\.(?:old\.)?[a-z0-9_]{8}")


class CorruptEntry(Exception):
    """A store entry that is missing files or fails a check (retrained, not loaded)."""


class LockTimeout(ConfigError):
    """Waited ``lock_timeout_s`` for another process's store lock; the message names it."""


def _check_key(key: str) -> str:
    # a key names a directory: anything but hex could climb out of the store (``../..``)
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise ConfigError(f"store key {key!r}: expected 8-64 lowercase hex digits")
    return key


class SourceStore:
    """Directory of trained sources, keyed by ``store_key``.

    Args:
        root: the store directory.
        lock_timeout_s: how long to wait for another process's lock on a key before failing
            (``LockTimeout``, naming the holder); None waits forever.
        log_every_s: how often a wait is logged.
        stale_after_s: age after which an unlocked temp directory counts as left by a killed save.
    """

    def __init__(self, root: str | Path, lock_timeout_s: float | None = 3600.0,
                 log_every_s: float = 30.0, stale_after_s: float = 600.0) -> None:
        self.root = Path(root)
        self.lock_timeout_s, self.log_every_s, self.stale_after_s = lock_timeout_s, log_every_s, stale_after_s

    def entry(self, key: str) -> Path:
        return self.root / _check_key(key)

    # --- locking ------------------------------------------------------------------------------
    def _lock_path(self, key: str) -> Path:
        return self.root / f"{_check_key(key)}.lock"

    def _owner_path(self, key: str) -> Path:
        return self.root / f"{_check_key(key)}.lock.owner"

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the key's lock (waiting as ``lock_timeout_s`` allows); record who holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._lock_path(key)
        lock = FileLock(str(path))
        self._acquire(lock, key)
        owner = self._owner_path(key)
        try:
            atomic_write_json(owner, {"pid": os.getpid(), "host": socket.gethostname(),
                                      "since": time.time()})
            yield
        finally:
            owner.unlink(missing_ok=True)
            lock.release()

    def _acquire(self, lock: FileLock, key: str) -> None:
        start = time.monotonic()
        while True:
            waited = time.monotonic() - start
            step = self.log_every_s
            if self.lock_timeout_s is not None:
                step = max(0.0, min(step, self.lock_timeout_s - waited))
            try:
                lock.acquire(timeout=step)
                return
            except Timeout:
                waited = time.monotonic() - start
            if self.lock_timeout_s is not None and waited >= self.lock_timeout_s:
                raise LockTimeout(f"store lock {self._lock_path(key)}: still held by {self.holder(key)} "
                                  f"after {waited:.0f} s (lock_timeout_s={self.lock_timeout_s:g}); "
                                  "wait for or stop that run, or raise lock_timeout_s")
            log.warning("waiting %.0f s for store lock %s, held by %s", waited,
                        self._lock_path(key), self.holder(key))

    def holder(self, key: str) -> str:
        """Who holds the key's lock, as recorded beside it (``pid P on host H since T``)."""
        try:
            rec = json.loads(self._owner_path(key).read_text())
            since = dt.datetime.fromtimestamp(float(rec["since"]), dt.timezone.utc)
            return (f"pid {int(rec['pid'])} on host {rec['host']} since "
                    f"{since.strftime('%Y-%m-%dT%H:%M:%SZ')}")
        except (OSError, ValueError, KeyError, TypeError):
            return "an unknown process (no owner record beside the lock)"

    # --- hygiene ----------------------------------------------------------------------------------
    def sweep(self) -> list[Path]:
        """Remove temp directories of saves that were killed: older than ``stale_after_s`` and not
        under their key's lock (a live save holds it). Returns what was removed."""
        removed: list[Path] = []
        stale: list[Path] = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.root) as it:
            stale = [Path(e.path) for e in it if TEMP_RE.fullmatch(e.name)
                     and e.is_dir(follow_symlinks=False)
                     and time.time() - e.stat(follow_symlinks=False).st_mtime >= self.stale_after_s]
        for tmp in stale:
            lock = FileLock(str(self._lock_path(TEMP_RE.fullmatch(tmp.name).group(1))))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a save of that key is running
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                removed.append(tmp)
                log.info("removed %s, left by an interrupted save", tmp)
            finally:
                lock.release()
        return removed

    # --- entries ----------------------------------------------------------------------------------
    def is_valid(self, key: str) -> bool:
        try:
            self.load(key)
            return True
        except CorruptEntry:
            return False

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict, dict]:
        """``(state, config, metrics)`` of a complete entry; ``CorruptEntry`` naming the failed
        check otherwise. Read like a package (bounded, config as data, no symlinks), except that
        the model may be the user's own: it is never built from the entry's config."""
        d = self.entry(key)
        where = f"store entry {d}"
        if not d.is_dir():
            raise CorruptEntry(f"{where}: missing")
        try:
            entry = read_entry(d, where, strict=False)
        except ConfigError as e:
            raise CorruptEntry(str(e)) from None
        if entry.manifest.get("key") != key:
            raise CorruptEntry(f"{where}: manifest names another key")
        return entry.state, entry.config, entry.metrics

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
                "key": key, "created": time.time(), "sha256": {f: sha256_file(tmp / f) for f in FILES}})
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
        then load what it saved. An invalid entry is retrained, and the log says why.
        """
        self.sweep()
        with contextlib.suppress(CorruptEntry):
            return (*self.load(key), True)
        with self.lock(key):
            try:  # someone else trained it while we waited
                return (*self.load(key), True)
            except CorruptEntry as e:
                if self.entry(key).exists():
                    log.warning("retraining source %s: %s", key, e)
                else:
                    log.info("source %s is not in the store %s: creating it", key, self.root)
            state, config, metrics = train()
            self.save(key, state, config, metrics)
            # return what is on disk, so the trainer and the waiters hold identical tensors
            return (*self.load(key), False)
