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
import time
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
                "hydra.launcher.mem_gb=2", "hydra.launcher.timeout_min=10"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        if os.environ.get("CI", "").lower() in ("true", "1"):  # CI installs them (.ci/run): absence is a failure
            pytest.fail(f"CI: {why}")
        pytest.skip(why)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def start_sweep(cluster: SlurmCluster, sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    """``python -m transfer_lab.train -m hydra/launcher=slurm ...`` in the background; its output
    goes to ``<sweep_dir>.log`` (a file: a pipe nobody reads while it runs could fill and block it)."""
    env = cluster.env()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "transfer_lab.train", "-m", *ON_THIS_NODE, *TINY, *overrides,
           f"hydra.sweep.dir={sweep_dir}", "hydra.sweep.subdir=${hydra.job.num}"]
    with open(f"{sweep_dir}.log", "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(p: subprocess.Popen, cluster: SlurmCluster, sweep_dir: Path, timeout: float = 300) -> None:
    """Wait for the launcher, which returns once every job has written its result."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        pytest.fail(f"sweep still running after {timeout:.0f} s\n{launcher_log(sweep_dir)}\n"
                    f"{job_logs(sweep_dir)}\n{cluster.logs()}")
    assert p.returncode == 0, f"sweep exited {p.returncode}\n{launcher_log(sweep_dir)}\n{job_logs(sweep_dir)}"


def launcher_log(sweep_dir: Path) -> str:
    return Path(f"{sweep_dir}.log").read_text(errors="replace")[-3000:]


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
    finish(start_sweep(cluster, sweep_dir, "strategy=finetune,linear_probe", f"store_dir={store}"),
           cluster, sweep_dir)

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


# The requeue sweep's cells, in order: each is interrupted once epoch 0's last.ckpt exists, by
# (name, command + job id, the line in the cell's job log that shows who requeued it)
INTERRUPTS = [
    # Slurm requeues the job itself (an admin, or PreemptMode=REQUEUE): SIGTERM, KillWait, SIGKILL
    ("slurm", ("scontrol", "requeue"), "CANCELLED AT"),
    # submitit's signal (--signal=USR2@signal_delay_s before the time limit, or at preemption):
    # it re-pickles the Hydra job and calls scontrol requeue; needs max_num_timeout > 0
    ("submitit", ("scancel", "--signal=USR2"), "Requeued job {job}"),
    # Lightning's SLURMEnvironment(auto_requeue=True): saves hpc_ckpt_*.ckpt, calls scontrol requeue
    ("lightning", ("scancel", "--signal=USR1"), "Requeued SLURM job: {job}"),
]
# 8 steps an epoch: the interrupt (within ~0.3 s of last.ckpt) lands with seconds of training to go
EPOCHS, N_TRAIN = 30, 256


def array_job_id(sweep_dir: Path, deadline: float) -> str:
    """The sweep's SLURM array job id: submitit names each task's folder ``<array id>_<task>``
    right after sbatch returns (squeue may still list the previous test's jobs, completing)."""
    while time.monotonic() < deadline:
        folders = list(sweep_dir.glob(".submitit/*_0"))
        if folders:
            return folders[0].name.split("_")[0]
        time.sleep(0.2)
    pytest.fail(f"no submitit folder in {sweep_dir}")


def interrupt_after_first_epoch(cluster: SlurmCluster, p: subprocess.Popen, sweep_dir: Path) -> str:
    """Interrupt each cell's job as soon as its first checkpoint is written; the array job id."""
    deadline = time.monotonic() + 240
    job = array_job_id(sweep_dir, deadline)
    pending = {str(i): cmd for i, (_, cmd, _) in enumerate(INTERRUPTS)}
    while pending and p.poll() is None and time.monotonic() < deadline:
        for cell, cmd in list(pending.items()):
            if (sweep_dir / cell / "checkpoints" / "last.ckpt").is_file():
                cluster.check(*cmd, f"{job}_{cell}")
                del pending[cell]
        time.sleep(0.1)
    assert not pending, f"cells {sorted(pending)} were not interrupted (sweep ended or 240 s passed)"
    return job


@pytest.fixture(scope="module")
def requeued(cluster, tmp_path_factory) -> tuple[Path, str]:
    """One sweep of three cells, each interrupted after its first epoch: (sweep dir, array job id)."""
    root = tmp_path_factory.mktemp("requeue")
    sweep_dir = root / "sweep"
    p = start_sweep(cluster, sweep_dir, "strategy=finetune,linear_probe,partial", f"store_dir={root / 'store'}",
                    f"target.epochs={EPOCHS}", f"target.data.n_train={N_TRAIN}")
    job = interrupt_after_first_epoch(cluster, p, sweep_dir)
    finish(p, cluster, sweep_dir)
    return sweep_dir, job


@pytest.mark.parametrize("cell, evidence", [(str(i), e) for i, (_, _, e) in enumerate(INTERRUPTS)],
                         ids=[name for name, _, _ in INTERRUPTS])
def test_requeued_cell_resumes_from_its_last_checkpoint_and_finishes_once(cluster, requeued, cell, evidence):
    sweep_dir, job = requeued
    r = json.loads((sweep_dir / cell / "results.json").read_text())
    assert r["status"] == "ok"
    assert r["target_training"]["epochs"] == EPOCHS
    resumed = r["target_training"]["resumed_after_epoch"]
    assert isinstance(resumed, int) and 0 <= resumed < EPOCHS - 1, r["target_training"]
    log = "".join(f.read_text() for f in sorted(sweep_dir.glob(f".submitit/{job}_{cell}/*_log.*")))
    assert evidence.format(job=f"{job}_{cell}") in log, log
    assert log.count("Starting with JobEnvironment") == 2, log  # ran twice ...
    assert log.count(f"[{r['strategy']} seed=0] target") == 1, log  # ... finished once
    assert "Restarts=1" in cluster.check("scontrol", "show", "job", f"{job}_{cell}")
