"""No silent waits, no leftovers: a lock wait says whom it waits for and ends; temp directories
of killed saves are swept; every retrain says why."""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time

import pytest
import torch

from reliability.helpers import KEY
from transfer_lab.errors import ConfigError
from transfer_lab.store import SourceStore


def fake_train(value: float = 1.0):
    return lambda: ({"w": torch.full((3, 2), value)}, {"key": KEY}, {"acc": value})


def hold(store: SourceStore, release: threading.Event, held: threading.Event) -> threading.Thread:
    """Another holder of ``KEY``'s lock (a thread: its FileLock is a separate open file)."""
    def run():
        with store.lock(KEY):
            held.set()
            release.wait(30)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert held.wait(10)
    return t


def test_lock_wait_names_the_holder_periodically_and_times_out(tmp_path, caplog):
    release, held = threading.Event(), threading.Event()
    t = hold(SourceStore(tmp_path), release, held)
    waiter = SourceStore(tmp_path, lock_timeout_s=1.0, log_every_s=0.3)
    start = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, logger="transfer_lab.store"), \
                pytest.raises(ConfigError) as e:
            waiter.get_or_create(KEY, fake_train())
    finally:
        release.set()
        t.join(10)
    assert 0.9 < time.monotonic() - start < 10
    msg = str(e.value)
    holder = f"pid {os.getpid()} on host {socket.gethostname()}"
    assert "\n" not in msg and holder in msg and "lock_timeout_s=1" in msg and KEY in msg
    waits = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(waits) >= 2 and all(holder in w for w in waits), waits
    assert not waiter.entry(KEY).exists()  # nothing trained


def test_lock_wait_without_timeout_continues_when_the_holder_finishes(tmp_path, caplog):
    release, held = threading.Event(), threading.Event()
    t = hold(SourceStore(tmp_path), release, held)
    threading.Timer(0.8, release.set).start()
    waiter = SourceStore(tmp_path, lock_timeout_s=None, log_every_s=0.2)
    with caplog.at_level(logging.WARNING, logger="transfer_lab.store"):
        state, _, _, hit = waiter.get_or_create(KEY, fake_train(2.0))
    t.join(10)
    assert hit is False and torch.equal(state["w"], torch.full((3, 2), 2.0))
    assert any("waiting" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / f"{KEY}.lock.owner").exists()  # the record goes with the lock


def kill_inside_save(store: SourceStore, key: str = KEY) -> str:
    """What a SIGKILL inside ``save`` leaves: a complete temp directory beside the entries."""
    tmp = tempfile.mkdtemp(prefix=f".{key}.", dir=store.root)
    for f in ("model.safetensors", "config.json", "metrics.json"):
        with open(os.path.join(tmp, f), "wb") as fh:
            fh.write(b"x" * 100)
    old = time.time() - 3600
    os.utime(tmp, (old, old))
    return tmp


def test_stale_temp_dirs_of_killed_saves_are_swept(tmp_path):
    store = SourceStore(tmp_path, stale_after_s=600)
    store.root.mkdir(exist_ok=True)
    stale = kill_inside_save(store)
    other = kill_inside_save(store, "fedcba9876543210fedc")
    fresh = tempfile.mkdtemp(prefix=f".{KEY}.", dir=store.root)  # a save running now
    (tmp_path / ".logs").mkdir()
    os.utime(tmp_path / ".logs", (0, 0))
    store.get_or_create(KEY, fake_train())
    assert not os.path.exists(stale) and not os.path.exists(other)
    assert os.path.exists(fresh) and (tmp_path / ".logs").is_dir()


def test_temp_dir_under_a_held_lock_is_not_swept(tmp_path):
    store = SourceStore(tmp_path, stale_after_s=0)
    store.root.mkdir(exist_ok=True)
    busy = kill_inside_save(store)
    release, held = threading.Event(), threading.Event()
    t = hold(SourceStore(tmp_path), release, held)
    try:
        assert store.sweep() == []
        assert os.path.exists(busy)
    finally:
        release.set()
        t.join(10)
    assert [p.name for p in store.sweep()] == [os.path.basename(busy)]


@pytest.mark.parametrize("how, reason", [
    ("flip", "checksum mismatch for model.safetensors"),
    ("manifest", "manifest.json is not valid JSON"),
    ("delete", "missing metrics.json"),
])
def test_every_retrain_of_an_existing_entry_says_why(tmp_path, caplog, how, reason):
    store = SourceStore(tmp_path)
    store.get_or_create(KEY, fake_train(1.0))
    entry = store.entry(KEY)
    if how == "flip":
        data = bytearray((entry / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (entry / "model.safetensors").write_bytes(bytes(data))
    elif how == "manifest":
        (entry / "manifest.json").write_text("{not json")
    else:
        (entry / "metrics.json").unlink()
    with caplog.at_level(logging.INFO, logger="transfer_lab.store"):
        assert store.get_or_create(KEY, fake_train(2.0))[3] is False
    said = [r for r in caplog.records if "retraining" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert reason in said[0].getMessage() and KEY in said[0].getMessage()
