"""Regression transfer: a table task (MSE loss; MSE, RMSE, R²) through the strategies that make
sense for it, end to end from the composed config."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose_cfg
from transfer_lab.analysis.runs import load_run
from transfer_lab.data.tables import synthetic_table
from transfer_lab.run import run


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("tables")
    src = synthetic_table(d / "house.csv", n=600, d=6, task_seed=0, seed=1)
    tgt = synthetic_table(d / "salary.csv", n=300, d=6, task_seed=0, shift=0.3, seed=2)
    return src, tgt


def regression_cfg(tables, store, *overrides):
    src, tgt = tables
    return compose_cfg("data@source.data=table", "data@target.data=table", "model@source.model=mlp",
                       "source.model.hidden=[32,32]", f"source.data.train_file={src}",
                       f"target.data.train_file={tgt}", "target.data.n_train=40",
                       "source.epochs=15", "target.epochs=15", "target.save_weights=full",
                       *overrides, store=store)


@pytest.mark.parametrize("strategy", ["scratch", "finetune", "linear_probe", "partial", "l2sp"])
def test_regression_run_reports_mse_rmse_r2_that_match_its_saved_model(tables, tmp_path, strategy):
    res = run(regression_cfg(tables, tmp_path / "store", f"strategy={strategy}"), tmp_path / "run")
    m = res["metrics"]
    assert res["status"] == "ok" and "test/acc" not in m and "per_class" not in res
    assert m["test/rmse"] == pytest.approx(math.sqrt(m["test/mse"]), rel=1e-5)
    # recompute from the saved weights, independently of the module's torchmetrics
    loaded = load_run(tmp_path / "run", tmp_path / "store")
    dm = loaded.target_dm
    with torch.no_grad():
        pred = loaded.target(dm.transform(dm.x_test, train=False)).squeeze(-1)
    mse = float(((pred - dm.y_test) ** 2).mean())
    r2 = 1 - mse / float(((dm.y_test - dm.y_test.mean()) ** 2).mean())
    assert m["test/mse"] == pytest.approx(mse, rel=1e-4)
    assert m["test/r2"] == pytest.approx(r2, abs=1e-4)
    assert ("transferability" in res) == (strategy != "scratch")
    if strategy != "scratch":
        assert res["transferability"] == {"skipped": "regression target"}
        assert res["source"]["test/r2"] > 0.5  # the source learned its own table
    if strategy == "linear_probe":  # the backbone is the source's, untouched
        for k, v in loaded.target.backbone.state_dict().items():
            assert torch.equal(v, loaded.source.backbone.state_dict()[k])


def test_a_related_source_helps_a_small_regression_target(tables, tmp_path):
    """40 target rows: fine-tuning from the related table beats training from scratch (R²)."""
    r2 = {s: run(regression_cfg(tables, tmp_path / "store", f"strategy={s}"), tmp_path / s)["metrics"]["test/r2"]
          for s in ("scratch", "finetune")}
    assert r2["finetune"] > r2["scratch"]
