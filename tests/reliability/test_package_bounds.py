"""Bounded unpacking: a package costs at most the memory of the model it describes; entry count,
sizes, symlinks and special files are checked before anything is decompressed or parsed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from reliability.test_safe_loading import make_spec, one_line, write_package
from transfer_lab.errors import ConfigError
from transfer_lab.io import sha256_bytes
from transfer_lab.models import mlp
from transfer_lab.store import SourceStore
from transfer_lab.package import import_package, load_state_dict, read_package

STATE = mlp(1, 8, 3, hidden=[16], batch_norm=True).state_dict()


def unpacked(tmp_path: Path) -> Path:
    """A valid package as a directory."""
    d = tmp_path / "pkg"
    with zipfile.ZipFile(write_package(tmp_path / "p.zip", STATE, make_spec())) as z:
        z.extractall(d)
    assert set(read_package(d)[0]) == set(STATE)
    return d


# --- sizes ----------------------------------------------------------------------------------------
BOMB = """
import resource, sys, zipfile
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from reliability.test_safe_loading import make_spec
from transfer_lab.errors import ConfigError
from transfer_lab.store import SourceStore
from transfer_lab.package import import_package

path = Path(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    import_package(path, SourceStore(path.parent / "store"))
    outcome = "accepted"
except ConfigError as e:
    outcome = "refused " + str(e)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
print(f"{(peak - base) / 1024:.0f}")
print(outcome)
"""


def zip_bomb(path: Path, gib: float = 1.0) -> Path:
    """A valid small package whose model.safetensors unpacks to ``gib`` GiB of zeros (~1 MB zipped)."""
    config = make_spec()
    blobs = {"config.json": json.dumps(config).encode(), "metrics.json": b"{}"}
    manifest = {"key": config["key"], "sha256": {f: sha256_bytes(b) for f, b in blobs.items()}}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        for f, b in blobs.items():
            z.writestr(f, b)
        z.writestr("manifest.json", json.dumps(manifest))
        with z.open("model.safetensors", "w", force_zip64=True) as f:
            chunk = bytes(1 << 24)
            for _ in range(int(gib * 64)):
                f.write(chunk)
    return path


@pytest.mark.slow
def test_zip_bomb_is_refused_within_300_mb(tmp_path):
    bomb = zip_bomb(tmp_path / "bomb.zip")
    assert bomb.stat().st_size < 2 << 20
    out = subprocess.run([sys.executable, "-c", BOMB, str(bomb), str(ROOT / "tests")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    grown_mb, outcome = out.stdout.strip().splitlines()
    assert outcome.startswith("refused") and "model.safetensors" in outcome, outcome
    assert int(grown_mb) < 300, f"peak memory grew by {grown_mb} MB"
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").glob("*/manifest.json"))


def test_weights_larger_than_the_described_model_are_refused_before_reading(tmp_path):
    """An extra 40 MB tensor beside a 1k-parameter model: refused by size, one line."""
    big = {**STATE, "backbone.extra": torch.zeros(10_000_000)}
    pkg = write_package(tmp_path / "p.zip", big, make_spec())
    with pytest.raises(ConfigError) as e:
        import_package(pkg, SourceStore(tmp_path / "store"))
    assert "model.safetensors" in one_line(e) and "refused" in one_line(e)


@pytest.mark.parametrize("name", ["config.json", "manifest.json", "metrics.json"])
def test_oversized_json_members_are_refused(tmp_path, name):
    pkg = write_package(tmp_path / "p.zip", STATE, make_spec())
    with zipfile.ZipFile(pkg) as z:
        members = {n: z.read(n) for n in z.namelist()}
    members[name] = members[name][:-1] + b" " * (2 << 20) + b"}"
    with zipfile.ZipFile(pkg, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n, b in members.items():
            z.writestr(n, b)
    with pytest.raises(ConfigError) as e:
        read_package(pkg)
    assert name in one_line(e) and "refused" in one_line(e)


# --- entries ----------------------------------------------------------------------------------------
def test_entry_count_is_capped(tmp_path):
    pkg = write_package(tmp_path / "p.zip", STATE, make_spec())
    with zipfile.ZipFile(pkg, "a") as z:
        for i in range(20):
            z.writestr(f"extra{i}.txt", b"x")
    with pytest.raises(ConfigError, match="entries") as e:
        import_package(pkg, SourceStore(tmp_path / "store"))
    one_line(e)


def test_symlinked_member_in_a_package_directory_is_refused(tmp_path):
    d = unpacked(tmp_path)
    real = tmp_path / "elsewhere.safetensors"
    (d / "model.safetensors").rename(real)
    (d / "model.safetensors").symlink_to(real)  # same bytes: only the link itself is wrong
    with pytest.raises(ConfigError, match="symlink") as e:
        load_state_dict(d)
    assert "model.safetensors" in one_line(e)


def test_symlink_to_a_secret_beside_the_package_files_is_refused(tmp_path):
    d = unpacked(tmp_path)
    (d / "notes").symlink_to("/etc/passwd")
    with pytest.raises(ConfigError, match="notes is a symlink"):
        read_package(d)


def test_special_file_in_a_package_directory_is_refused(tmp_path):
    d = unpacked(tmp_path)
    os.mkfifo(d / "pipe")
    with pytest.raises(ConfigError, match="pipe is a special file") as e:
        import_package(d, SourceStore(tmp_path / "store"))
    one_line(e)


def test_package_directory_that_is_a_symlink_is_refused(tmp_path):
    d = unpacked(tmp_path)
    (tmp_path / "link").symlink_to(d)
    with pytest.raises(ConfigError, match="symlink"):
        read_package(tmp_path / "link")


def test_store_entry_with_a_symlink_is_retrained_not_followed(tmp_path):
    store, key = SourceStore(tmp_path / "store"), "0123456789abcdef0123"
    store.save(key, STATE, {"key": key}, {})
    entry = store.entry(key)
    (entry / "metrics.json").rename(tmp_path / "m.json")
    (entry / "metrics.json").symlink_to(tmp_path / "m.json")
    assert not store.is_valid(key)


def test_zip_member_that_is_a_symlink_is_refused(tmp_path):
    pkg = write_package(tmp_path / "p.zip", STATE, make_spec())
    with zipfile.ZipFile(pkg) as z:
        members = {n: z.read(n) for n in z.namelist()}
    with zipfile.ZipFile(pkg, "w") as z:
        for n, b in members.items():
            info = zipfile.ZipInfo(n)
            if n == "metrics.json":
                info.external_attr = (0o120777 << 16)  # S_IFLNK
            z.writestr(info, b)
    with pytest.raises(ConfigError, match="symlink"):
        read_package(pkg)


def test_valid_package_still_round_trips_as_zip_and_directory(tmp_path):
    d = unpacked(tmp_path)
    for source in (d, tmp_path / "p.zip"):
        state = load_state_dict(source)
        assert state.keys() == STATE.keys() and all(torch.equal(state[k], v) for k, v in STATE.items())


def test_total_size_counts_members_that_are_never_read(tmp_path):
    pkg = write_package(tmp_path / "p.zip", STATE, make_spec())
    with zipfile.ZipFile(pkg, "a", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("CARD.md", bytes(32 << 20))
    with pytest.raises(ConfigError, match="bytes in all") as e:
        read_package(pkg)
    one_line(e)
