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
