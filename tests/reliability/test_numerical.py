"""Numerical faults: a non-finite loss stops the run with a message naming the step and the
strategy, and results.json records the run as failed (the report lists it)."""

from __future__ import annotations

import json

import pytest

from conftest import compose_cfg
from transfer_lab.run import run

NAN_STRATEGY = ("strategy._target_=reliability.helpers.NaNLoss", "+strategy.at_step=1")


@pytest.mark.parametrize("overrides, strategy", [
    (NAN_STRATEGY, "NaNLoss"),
    # a real strategy driven into overflow by an absurd learning rate
    (("strategy=finetune", "optimizer@target.optimizer=sgd", "target.optimizer.lr=1e38"), "Finetune"),
])
def test_non_finite_loss_stops_the_run_and_is_recorded_as_failed(tmp_path, overrides, strategy):
    cfg = compose_cfg(*overrides, "target.epochs=4", "source.epochs=1", store=tmp_path / "store")
    with pytest.raises(Exception) as e:
        run(cfg, tmp_path / "out")
    msg = str(e.value)
    assert "non-finite" in msg and "step" in msg and f"strategy={strategy}" in msg
    assert "epoch 0" in msg, "training went on past the epoch of the fault"
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["status"] == "failed" and f"strategy={strategy}" in res["error"]
    assert "metrics" not in res  # no numbers from a broken run reach a table

    from transfer_lab.report import collect
    rows, problems = collect(tmp_path)
    assert rows.empty and [p["status"] for p in problems] == ["failed"]
    assert "non-finite" in problems[0]["error"]


SOURCE_NAN = ("strategy=finetune", "optimizer@source.optimizer=sgd", "source.optimizer.lr=1e38")


def test_source_stage_nan_is_a_failed_record_naming_the_source_stage(tmp_path):
    from transfer_lab.results import RunFailed

    cfg = compose_cfg(*SOURCE_NAN, "source.epochs=2", store=tmp_path / "store")
    with pytest.raises(RunFailed, match="^source stage failed: NonFiniteLossError") as e:
        run(cfg, tmp_path / "out")
    assert "strategy=" not in str(e.value) and "\n" not in str(e.value)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (res["status"], res["stage"]) == ("failed", "source")
    assert "while training the source" in res["error"] and "metrics" not in res

    from transfer_lab.report import collect
    _, problems = collect(tmp_path)
    assert [p["status"] for p in problems] == ["failed"]


@pytest.mark.slow
def test_single_run_failure_prints_one_line_exits_1_and_logs_the_traceback(tmp_path, monkeypatch, capsys):
    import sys

    from hydra.core.global_hydra import GlobalHydra

    from conftest import TINY
    from transfer_lab.train import main

    out = tmp_path / "run"
    monkeypatch.setattr(sys, "argv", ["transfer_lab.train", *TINY, *SOURCE_NAN, f"store_dir={tmp_path}/s",
                                      f"hydra.run.dir={out}"])
    try:
        with pytest.raises(SystemExit) as e:
            main()
    finally:
        GlobalHydra.instance().clear()
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert [ln for ln in err.splitlines() if ln.startswith("error:")] == [
        "error: " + "source stage failed: " + json.loads((out / "results.json").read_text())["error"]]
    assert "Traceback" in (out / "train.log").read_text()


def test_disk_full_in_the_store_is_a_failed_record(tmp_path, monkeypatch):
    import errno

    from transfer_lab.results import RunFailed
    from transfer_lab.store import SourceStore

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root))

    monkeypatch.setattr(SourceStore, "save", full)
    with pytest.raises(RunFailed, match="No space left on device"):
        run(compose_cfg("strategy=finetune", "source.epochs=1", store=tmp_path / "store"), tmp_path / "out")
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert (res["status"], res["stage"]) == ("failed", "source") and "ENOSPC" not in res["error"]
    assert res["error"].startswith("OSError: ")
