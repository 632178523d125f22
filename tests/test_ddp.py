"""trainer=ddp: a 2-process CPU (gloo) run writes one results.json and trains one store entry."""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, TINY


@pytest.mark.slow
def test_two_process_cpu_ddp_writes_one_result_and_one_store_entry(tmp_path):
    # a subprocess: Lightning starts rank 1 by re-running this command line
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFER_LAB_STORE": str(tmp_path / "store")}
    cmd = [sys.executable, "-m", "transfer_lab.train", *TINY, "trainer=ddp", "trainer.devices=2",
           "strategy=finetune", f"hydra.run.dir={tmp_path}/run"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = list(tmp_path.rglob("results.json"))
    assert results == [tmp_path / "run" / "results.json"]
    res = json.loads(results[0].read_text())
    assert res["status"] == "ok" and res["target_training"]["world_size"] == 2
    assert res["source"]["cache_hit"] is False  # rank 0 trained it; rank 1 loaded it
    entries = [p for p in (tmp_path / "store").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert [p.name for p in entries] == [res["source"]["key"]]
    assert done.stdout.count("[finetune seed=0]") == 1  # one summary line, from rank 0
    assert not (tmp_path / "run" / "checkpoints").exists()
