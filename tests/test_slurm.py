"""``hydra/launcher=slurm`` against a real single-node SLURM (tests/slurm_cluster.py).

The sweep goes through the real ``sbatch`` of a cluster started on this machine: each cell is a
SLURM array task that runs in this test's Python environment (``sys.executable``), and the cells
that need a source share one source training through the store's lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_cluster import SlurmCluster, missing

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
# tiny, offline, CPU; the launcher's GPU/CPU/memory asks shrunk to this one 2-CPU node
TINY = ["data@source.data=synthetic", "data@target.data=synthetic", "model@source.model=tiny_cnn",
        "source.epochs=2", "target.epochs=2", "trainer=cpu", "trainer.enable_progress_bar=false",
        "transferability=false"]
ON_THIS_NODE = ["hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "hydra.launcher.cpus_per_task=1",
                "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        if os.environ.get("CI", "").lower() == "true":  # CI installs them (.ci/run): absence is a failure
            pytest.fail(f"CI: {why}")
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def sweep(cluster: SlurmCluster, sweep_dir: Path, *overrides: str, timeout: float = 300) -> None:
    """``python -m transfer_lab.train -m hydra/launcher=slurm ...``; returns when every job has ended."""
    env = cluster.env()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "transfer_lab.train", "-m", *ON_THIS_NODE, *TINY, *overrides,
           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"]
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"sweep still running after {timeout:.0f} s\n{job_logs(sweep_dir)}\n{cluster.logs()}\n{e.stderr}")
    assert p.returncode == 0, f"sweep exited {p.returncode}\n{p.stderr[-3000:]}\n{job_logs(sweep_dir)}"


def job_logs(sweep_dir: Path, tail: int = 20) -> str:
    """The end of every SLURM job's stderr (submitit's folder), for failure messages."""
    out = []
    for p in sorted(sweep_dir.glob(".submitit/*/*_log.err")):
        out.append(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-tail:]))
    return "\n".join(out)


def results_under(d: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(d.glob("*/results.json"))}


def test_two_cells_through_sbatch_share_one_source_training(cluster, tmp_path):
    sweep_dir, store = tmp_path / "sweep", tmp_path / "store"
    sweep(cluster, sweep_dir, "strategy=finetune,linear_probe", f"store_dir={store}")

    res = results_under(sweep_dir)
    assert sorted(res) == ["0", "1"] and all(r["status"] == "ok" for r in res.values()), res
    assert {r["strategy"] for r in res.values()} == {"finetune", "linear_probe"}
    # each cell ran as its own SLURM array task (submitit's folder holds one log per task)
    assert len(list(sweep_dir.glob(".submitit/*/*_log.out"))) == 2
    # one source training served both cells: one store entry, one training log, one cache hit
    assert len({r["source"]["key"] for r in res.values()}) == 1
    assert sorted(r["source"]["cache_hit"] for r in res.values()) == [False, True]
    assert [p.name for p in store.iterdir() if p.is_dir() and p.name != ".logs"] == [res["0"]["source"]["key"]]
    assert len(list((store / ".logs").iterdir())) == 1
