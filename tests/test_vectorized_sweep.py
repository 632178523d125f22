"""Grouping a sweep's seeds: the ``vectorized`` Hydra launcher writes every cell's results.json as
the ordinary sweep would, and a re-run skips them. The launcher's package is mapped into the
``hydra_plugins`` namespace on ``sys.path`` here (``mapped_plugins``, a local helper), as
pyproject's package-dir mapping does once installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, compose_cfg
from safetensors.torch import load_file

from transfer_lab.vectorized.group import cheap_check, group_key

ROOT = Path(__file__).resolve().parents[1]


def test_group_key_ignores_only_the_seed():
    a = group_key(["strategy=lora", "seed=0", "target.epochs=2"])
    assert a == group_key(["target.epochs=2", "seed=7", "strategy=lora"])
    assert a != group_key(["strategy=lora", "seed=0", "target.epochs=3"])
    assert group_key(["+seed=1", "x=1"]) == group_key(["x=1"])


@pytest.mark.parametrize(("overrides", "ok"), [
    (["strategy=finetune"], True), (["strategy=lora"], True),
    (["strategy=dann"], False), (["strategy=gradual_unfreeze"], False),
    (["strategy=finetune", "++vectorize_seeds=false"], False),
    (["strategy=finetune", "trainer.devices=2", "trainer.strategy=ddp"], False),
    (["strategy=finetune", "optimizer@target.optimizer=sgd"], True),
    (["strategy=finetune", "trainer=fast"], False),
])
def test_cheap_check_decides_from_the_config_alone(overrides, ok):
    got, why = cheap_check(compose_cfg(*overrides))
    assert got is ok and why


def mapped_plugins(tmp: Path) -> str:
    """A ``hydra_plugins/transfer_lab_launcher`` → ``transfer_lab/vectorized/hydra_plugin`` link."""
    ns = tmp / "plugins" / "hydra_plugins"
    ns.mkdir(parents=True)
    (ns / "transfer_lab_launcher").symlink_to(ROOT / "transfer_lab" / "vectorized" / "hydra_plugin")
    return str(tmp / "plugins")


def sweep(tmp: Path, name: str, *extra: str) -> tuple[str, dict[int, dict], dict[int, Path]]:
    plugins = str(tmp / "plugins") if (tmp / "plugins").exists() else mapped_plugins(tmp)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), plugins]),
           "TRANSFER_LAB_STORE": str(tmp / "store")}
    cmd = [sys.executable, "-m", "transfer_lab.train", "-m", "hydra/launcher=vectorized", "seed=0,1,2",
           "strategy=finetune", *TINY, "source.epochs=1", "target.epochs=3", "transferability=false",
           f"hydra.sweep.dir={tmp / name}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted((tmp / name).glob("*/results.json"))
    res = {json.loads(f.read_text())["seed"]: json.loads(f.read_text()) for f in files}
    return proc.stdout + proc.stderr, res, {r["seed"]: f.parent for r, f in zip(res.values(), files)}


@pytest.mark.slow
def test_vectorised_sweep_writes_each_cell_as_the_plain_sweep_does_and_resumes(tmp_path):
    log, vec, dirs = sweep(tmp_path, "vec")
    assert "as one vectorised model" in log
    _, plain, plain_dirs = sweep(tmp_path, "plain", "++vectorize_seeds=false")
    assert sorted(vec) == sorted(plain) == [0, 1, 2]
    for seed in vec:
        v, p = vec[seed], plain[seed]
        assert v["target_training"]["vectorized_seeds"] == [0, 1, 2]
        assert "vectorized_seeds" not in p["target_training"]
        assert set(v) == set(p) and v["status"] == "ok"
        assert v["metrics"].keys() == p["metrics"].keys()
        for k, x in p["metrics"].items():
            assert v["metrics"][k] == pytest.approx(x, abs=1e-4), (seed, k)
        wv = load_file(dirs[seed] / v["weights"]["file"])
        wp = load_file(plain_dirs[seed] / p["weights"]["file"])
        assert all((wv[k].double() - wp[k].double()).abs().max() < 1e-4 for k in wp)
        assert (dirs[seed] / ".hydra" / "overrides.yaml").is_file()  # run_job still ran the cell
    stamps = {s: (d / "results.json").stat().st_mtime_ns for s, d in dirs.items()}
    again, _, _ = sweep(tmp_path, "vec")
    assert "as one vectorised model" not in again and again.count("skipped (done)") == 3
    assert stamps == {s: (d / "results.json").stat().st_mtime_ns for s, d in dirs.items()}
