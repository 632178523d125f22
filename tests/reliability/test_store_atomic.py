"""Nothing lost, nothing partial: atomic writes, one training per store key across processes,
corrupt entries retrained rather than loaded."""

from __future__ import annotations

import ast
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from reliability.helpers import KEY, state_digest, store_worker
from transfer_lab.io import atomic_write_json
from transfer_lab.store import CorruptEntry, SourceStore


def fake_train(calls: list, value: float = 1.0):
    def train():
        calls.append(1)
        return {"w": torch.full((3, 2), value), "b": torch.zeros(2)}, {"key": KEY}, {"acc": value}
    return train


# --- one training per key, across processes ---------------------------------------------------
def test_four_processes_train_a_key_once_and_load_identical_weights(tmp_path):
    # separate processes with their own file descriptors, which is what the file lock has to
    # hold across; fork rather than spawn because each spawned child re-imports torch and
    # Lightning (~8 s of CPU apiece on this shared machine) for a test about locking
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier = ctx.Barrier(4)
    procs = [ctx.Process(target=store_worker, args=(str(tmp_path / "store"), str(tmp_path), barrier))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0] * 4
    assert len(list(tmp_path.glob("train.*"))) == 1, "the key was trained more than once"
    loaded = [f.read_text().split() for f in tmp_path.glob("loaded.*")]
    assert len(loaded) == 4
    assert len({digest for digest, _ in loaded}) == 1, "processes loaded different weights"
    assert sorted(hit for _, hit in loaded) == ["False", "True", "True", "True"]
    state, _, _ = SourceStore(tmp_path / "store").load(KEY)
    assert state_digest(state) == loaded[0][0]
    leftovers = [p.name for p in (tmp_path / "store").iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temp dirs left behind: {leftovers}"


# --- corrupt entries --------------------------------------------------------------------------
def _corrupt(entry: Path, how: str) -> None:
    if how == "truncate_model":
        data = (entry / "model.safetensors").read_bytes()
        (entry / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif how == "flip_byte":  # same size, one bit different: only a checksum sees it
        data = bytearray((entry / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (entry / "model.safetensors").write_bytes(bytes(data))
    elif how.startswith("delete_"):
        (entry / how.removeprefix("delete_")).unlink()
    elif how == "bad_manifest_json":
        (entry / "manifest.json").write_text("{not json")
    elif how == "manifest_other_key":
        m = json.loads((entry / "manifest.json").read_text())
        (entry / "manifest.json").write_text(json.dumps({**m, "key": "ffffffffffffffffffff"}))
    elif how == "edit_metrics":
        (entry / "metrics.json").write_text('{"acc": 99}')
    elif how == "empty_dir":
        for f in entry.iterdir():
            f.unlink()


@pytest.mark.parametrize("how", ["truncate_model", "flip_byte", "delete_model.safetensors",
                                 "delete_manifest.json", "delete_config.json", "bad_manifest_json",
                                 "manifest_other_key", "edit_metrics", "empty_dir"])
def test_corrupt_entry_is_detected_and_retrained_not_loaded(tmp_path, how):
    store, calls = SourceStore(tmp_path), []
    store.get_or_create(KEY, fake_train(calls, 1.0))
    _corrupt(store.entry(KEY), how)
    assert not store.is_valid(KEY)
    with pytest.raises(CorruptEntry):
        store.load(KEY)
    state, _, metrics, hit = store.get_or_create(KEY, fake_train(calls, 2.0))
    assert hit is False and len(calls) == 2
    assert torch.equal(state["w"], torch.full((3, 2), 2.0)) and metrics == {"acc": 2.0}
    assert store.is_valid(KEY)
    assert store.get_or_create(KEY, fake_train(calls))[3] is True and len(calls) == 2


def test_failed_training_leaves_no_entry_and_releases_the_lock(tmp_path):
    store = SourceStore(tmp_path)

    def boom():
        raise RuntimeError("source training crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        store.get_or_create(KEY, boom)
    assert not store.entry(KEY).exists()
    calls: list = []
    assert store.get_or_create(KEY, fake_train(calls))[3] is False and calls == [1]


def test_crash_while_saving_keeps_the_old_entry_or_none(tmp_path, monkeypatch):
    """A save that dies before its final rename leaves the previous entry intact, no temp dirs."""
    store, calls = SourceStore(tmp_path), []
    store.get_or_create(KEY, fake_train(calls, 1.0))
    _corrupt(store.entry(KEY), "edit_metrics")  # invalid, so the next ask retrains

    real_replace = os.replace

    def dying_replace(src, dst):
        if Path(dst) == store.entry(KEY):
            raise KeyboardInterrupt("killed mid-save")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        store.get_or_create(KEY, fake_train(calls, 2.0))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{KEY}.") and
                not any(p.glob("entry"))]
    state, _, _, hit = store.get_or_create(KEY, fake_train(calls, 3.0))
    assert hit is False and torch.equal(state["w"], torch.full((3, 2), 3.0))


# --- atomic files -------------------------------------------------------------------------------
WRITER = """
import sys
from transfer_lab.io import atomic_write_json
path = sys.argv[1]
i = 0
while True:
    i += 1
    atomic_write_json(path, {"version": i, "payload": [i] * 20000})
"""


def test_sigkilled_writer_leaves_old_or_new_file_never_half(tmp_path):
    """A process rewriting a 100 kB JSON file is SIGKILLed at random moments: the file always
    parses, and is one complete version."""
    path = tmp_path / "results.json"
    atomic_write_json(path, {"version": 0, "payload": [0] * 20000})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for delay in (0.3, 0.45, 0.6, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], env=env)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        obj = json.loads(path.read_text())
        assert obj["payload"] == [obj["version"]] * 20000
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json" and p.stat().st_size == 0
                and not p.name.startswith(".results.json.")]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    atomic_write_json(path, {"v": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # the temp file is gone


WRITE_CALLS = {"write_text", "write_bytes", "save_file", "save", "dump", "savefig"}


def _direct_writes(path: Path) -> list[str]:
    """Calls that write a final file in place (not through transfer_lab.io)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            fn = ast.unparse(node.func)
            first = ast.unparse(node.args[0]) if node.args else ""
            if fn.split(".")[-1] in WRITE_CALLS and "buf" not in first:
                found.append(f"{path.name}:{node.lineno} {fn}")
            if fn == "open" and any("w" in ast.unparse(a) for a in node.args[1:2]):
                found.append(f"{path.name}:{node.lineno} open(w)")
    return found


@pytest.mark.parametrize("name", [
    "checkpoint.py", "report.py", "report_render.py",
    "run.py", "analyze.py",
])
def test_results_reports_and_weights_are_written_atomically(name):
    path = ROOT / "transfer_lab" / name
    if not path.exists():
        pytest.skip(f"{name} not present")
    assert not _direct_writes(path)
