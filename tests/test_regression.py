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
    mean, std = dm.target_norm  # the model predicts the standardised target
    assert mean == pytest.approx(float(dm.y_train.mean()), rel=1e-5) and std > 0
    with torch.no_grad():
        pred = loaded.target(dm.transform(dm.x_test, train=False)).squeeze(-1) * std + mean
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


def test_embedded_boston_table_splits_into_two_domains_by_a_column():
    from transfer_lab.errors import ConfigError
    from transfer_lab.data.tables import TableData

    kw = dict(train_file="embedded:boston_housing", target="MEDV", test_fraction=0.4, val_fraction=0.0)
    low = TableData(where=["LSTAT", "<=", 11.36], **kw).prepare()
    high = TableData(where=["LSTAT", ">", 11.36], **kw).prepare()
    assert len(low.y_train) + len(low.y_test) + len(high.y_train) + len(high.y_test) == 506
    lstat = low.feature_names.index("LSTAT")
    raw = lambda dm, x: (x.reshape(len(x), -1)[:, lstat])  # noqa: E731 — stored unstandardised
    assert float(raw(low, low.x_train).max()) <= 11.36 < float(raw(high, high.x_test).min())
    assert high.target_norm[0] < low.target_norm[0]  # poorer tracts: cheaper homes
    with pytest.raises(ConfigError, match=r"where=\['LSTAT', '<<', 1\]"):
        TableData(where=["LSTAT", "<<", 1], **kw).prepare()
    with pytest.raises(ConfigError, match="no row"):
        TableData(where=["LSTAT", ">", 1000], **kw).prepare()


@pytest.mark.parametrize("overrides, expect", [
    (["strategy=distill"], "handles classification tasks, but target.data is a regression task"),
    (["strategy=multitask"], "handles classification tasks"),
    (["strategy=finetune", "target.data.n_train=0"], "target.data.n_train=0: must be an integer ≥ 1"),
    (["strategy=finetune", "target.data.where=[x0,'<',abc]"], "target.data.where=['x0', '<', 'abc']: the value must be a number"),
    (["strategy=scratch", "target.data.val_fraction=0.004"], "target.data.val_fraction=0.004: leaves 1 row"),
])
def test_regression_config_errors_come_before_training(tables, tmp_path, overrides, expect):
    from transfer_lab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        run(regression_cfg(tables, tmp_path / "store", *overrides), tmp_path / "run")
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").glob("*/manifest.json"))
