"""Issue 8 analyses: linear CKA, weight drift, Kendall's τ, analyze on real runs (LogME / LEEP:
test_transferability.py)."""

import json
import math

import pytest
import torch

from conftest import compose_cfg
from transfer_lab.analysis import cka_matrix, kendall_tau, linear_cka, relative_drift
from transfer_lab.analysis.aggregate import labels as run_labels
from transfer_lab.analysis.summary import group, metrics_table, rank_summary
from transfer_lab.analyze import main as analyze_main
from transfer_lab.models import convnet
from transfer_lab.run import run


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: on a shared CPU, intra-op threads cost more than they save."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- CKA ------------------------------------------------------------------------------------------
def test_cka_is_one_with_itself_and_invariant_to_rotation_and_scale():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, x.double() @ q) == pytest.approx(1.0, abs=1e-10)
    y = torch.randn(60, 7, generator=g).double() @ torch.randn(7, 30, generator=g).double()
    base = linear_cka(x, y)
    assert 0 < base < 1
    assert linear_cka(x.double() @ q * 3.7, y * 0.01) == pytest.approx(base, abs=1e-10)
    # a non-orthogonal map changes it: the invariance is specific, not a constant function
    stretch = torch.diag(torch.tensor([50.0] + [1.0] * 11, dtype=torch.float64))
    assert abs(linear_cka(x @ stretch, y) - base) > 1e-3


def test_cka_gram_form_equals_the_feature_space_formula():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g).double(), torch.randn(40, 9, generator=g).double()
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = (torch.linalg.norm(yc.T @ xc) ** 2 /
                (torch.linalg.norm(xc.T @ xc) * torch.linalg.norm(yc.T @ yc)))
    assert linear_cka(x, y) == pytest.approx(float(expected), rel=1e-10)
    assert cka_matrix([x, y], [y])[0][0] == pytest.approx(float(expected), rel=1e-10)
    # 4-d conv maps are flattened per input
    assert linear_cka(x.reshape(40, 5, 1, 1), y) == pytest.approx(float(expected), rel=1e-10)


def test_drift_is_zero_for_identical_and_none_for_mismatched_layers():
    torch.manual_seed(0)
    a, b = convnet(1, 12, 3, channels=[4, 8]), convnet(1, 12, 3, channels=[4, 16])
    paths = ["backbone.conv1", "backbone.conv2"]
    d = relative_drift(a, a, paths)
    assert d == {"backbone.conv1": 0.0, "backbone.conv2": 0.0}
    d = relative_drift(a, b, paths + ["backbone.nope"])
    assert d["backbone.conv2"] is None and d["backbone.nope"] is None and d["backbone.conv1"] > 0
    with torch.no_grad():
        c = convnet(1, 12, 3, channels=[4, 8])
        c.load_state_dict(a.state_dict())
        c.backbone.conv1[0].weight.mul_(1.5)  # BN weight/bias unchanged
    w, bn = a.backbone.conv1[0].weight.detach(), a.backbone.conv1[1]
    expect = 0.5 * w.norm() / torch.cat([w.flatten(), bn.weight.detach(), bn.bias.detach()]).norm()
    assert relative_drift(a, c, paths)["backbone.conv1"] == pytest.approx(float(expect), rel=1e-6)


# --- ranking ---------------------------------------------------------------------------------------
def test_kendall_tau_by_hand_and_against_scipy():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)  # 2 concordant, 1 discordant
    assert math.isnan(kendall_tau([1, 1, 1], [1, 2, 3]))
    stats = pytest.importorskip("scipy.stats")
    a, b = [0.1, 0.4, 0.4, 0.9, 0.3, 0.7], [3, 1, 2, 2, 5, 8]
    assert kendall_tau(a, b) == pytest.approx(stats.kendalltau(a, b).statistic)


def test_rank_summary_groups_sources_over_seeds():
    results, scores = [], []
    for seed in (0, 1):
        for model, acc, s in (("convnet", 0.9, 2.0), ("lenet", 0.8, 1.0), ("mlp", 0.7, 1.5)):
            results.append({"seed": seed, "choices": {"model@source.model": model, "strategy": "finetune"},
                            "config": {"seed": seed, "source": {"model": {"_target_": model}}},
                            "metrics": {"test/acc": acc + 0.01 * seed}})
            scores.append({"logme": s, "leep": -s})
    assert run_labels(results)[:2] == ["source.model=convnet", "source.model=lenet"]
    out = rank_summary(results, scores)
    assert len(out["rows"]) == 3 and all(r["n"] == 2 for r in out["rows"])
    assert out["tau_of_means"]["logme"] == pytest.approx(1 / 3)
    assert out["tau_of_means"]["leep"] == pytest.approx(-1 / 3)
    assert out["tau_per_seed"][1]["logme"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("vary, groups", [
    ({"logger": ["csv", "tensorboard"]}, ["all"]),         # NON_RESULT_KEYS never split a group
    ({"store_dir": ["/a", "/b"]}, ["all"]),
    ({"lr": [0.1, 0.01]}, ["lr=0.01", "lr=0.1"]),          # a result-changing key does
])
def test_analysis_groups_as_the_report_does(vary, groups):
    (key, values), = vary.items()
    results = [{"seed": seed, "strategy": "finetune", "config": {"seed": seed, key: v},
                "choices": {"strategy": "finetune", **({key: v} if key == "logger" else {})}}
               for v in values for seed in (0, 1)]
    items = [{"acc": 0.5, "balanced_acc": 0.5, "per_class_acc": [0.5]} for _ in results]
    assert sorted(group(results, items)) == groups


def test_one_seed_has_no_spread_in_analysis_tables_either():
    results = [{"seed": 0, "strategy": "finetune", "config": {"seed": 0}, "choices": {}}]
    table = metrics_table(group(results, [{"acc": 0.5, "balanced_acc": 0.25, "per_class_acc": [0.5]}]))
    assert "| all | 1 | 0.500 ± — | 0.250 ± — | 0.50 |" in table


# --- analyze on finished runs --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    store = root / "store"
    out = {}
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    for strategy in ("linear_probe", "finetune"):
        cfg = compose_cfg(f"strategy={strategy}", "source.epochs=1", store=store)
        out[strategy] = (root / "multirun" / strategy, run(cfg, root / "multirun" / strategy))
    torch.set_num_threads(before)
    return root, out


def test_analyze_linear_probe_has_zero_backbone_drift_and_identical_features(finished_runs):
    root, runs = finished_runs
    run_dir, results = runs["linear_probe"]
    assert results["weights"]["mode"] == "trainable"  # rebuilt from the source + overlay
    assert analyze_main([str(run_dir)]) == 0
    a = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert a["drift"]["backbone.pool"] is None  # no weights to move
    weighted = {k: v for k, v in a["drift"].items() if v is not None}
    assert set(weighted) == {"backbone.conv1", "backbone.conv2"}
    assert all(v == 0.0 for v in weighted.values())
    assert all(v == 0.0 for v in a["bn_stats_drift"].values() if v is not None)
    for path, value in a["cka"]["diagonal"].items():
        if path != "head":
            assert value == pytest.approx(1.0, abs=1e-6), path
    # the reloaded target reproduces the accuracy the run measured
    assert a["metrics"]["acc"] == pytest.approx(results["metrics"]["test/acc"], abs=1e-6)
    assert (run_dir / "analysis" / "cka.png").stat().st_size > 1000
    assert (run_dir / "analysis" / "drift.png").stat().st_size > 1000


def test_analyze_finetune_moves_weights_and_ranks_and_metrics(finished_runs, capsys):
    root, runs = finished_runs
    run_dir, results = runs["finetune"]
    assert results["weights"]["mode"] == "full"
    assert analyze_main([str(run_dir)]) == 0
    a = json.loads((run_dir / "analysis" / "analysis.json").read_text())
    assert a["drift"]["backbone.conv1"] > 0 and a["drift"]["backbone.conv2"] > 0
    assert set(a["cka"]["diagonal_source_bn_stats"]) == set(a["cka"]["diagonal"])
    from transfer_lab.analysis.runs import load_run
    from transfer_lab.analyze import with_source_bn_stats
    loaded = load_run(run_dir)
    swapped = with_source_bn_stats(loaded.target, loaded.source)
    bn_t, bn_s, bn_w = (m.backbone.conv1[1] for m in (loaded.target, loaded.source, swapped))
    assert torch.equal(bn_w.running_mean, bn_s.running_mean)
    assert not torch.equal(bn_t.running_mean, bn_s.running_mean)  # the run did re-estimate them
    assert torch.equal(bn_w.weight, bn_t.weight)  # weights stay the target's
    assert a["metrics"]["acc"] == pytest.approx(results["metrics"]["test/acc"], abs=1e-6)
    assert analyze_main(["--metrics", str(root / "multirun")]) == 0
    assert "balanced acc" in capsys.readouterr().out
    out_json = root / "rank.json"
    assert analyze_main(["--rank", str(root / "multirun"), "--json", str(out_json)]) == 0
    rank = json.loads(out_json.read_text())
    assert len(rank["rows"]) == 2 and all(math.isfinite(r["logme"]) for r in rank["rows"])


def test_analyze_names_a_directory_without_runs(tmp_path, capsys):
    assert analyze_main([str(tmp_path)]) == 2
    assert "no finished runs" in capsys.readouterr().err


# --- regression tables (data half of the regression task type) ---------------------------------------
def test_table_data_standardises_with_training_rows_and_feeds_an_mlp(tmp_path):
    from transfer_lab.data.tables import TableData, synthetic_table
    from transfer_lab.models import mlp

    path = synthetic_table(tmp_path / "house.csv", n=200, d=6, seed=1)
    dm = TableData(train_file=str(path), target="y", n_train=50, seed=3, val_fraction=0.1).prepare()
    assert dm.input_shape == (6, 1, 1) and dm.num_classes == 1
    assert (len(dm.y_train), len(dm.y_val), len(dm.y_test)) == (50, 16, 40)
    # feature statistics come from every training-side row, whatever the budget (a constant
    # feature among 50 rows must not be divided by ~0), never from the test rows
    full = TableData(train_file=str(path), target="y", seed=3, val_fraction=0.0).prepare()
    assert torch.equal(dm.mean, full.mean) and torch.equal(dm.std, full.std)
    x = full.transform(full.x_train, train=True)
    assert torch.allclose(x.mean(0).flatten(), torch.zeros(6), atol=1e-5)
    assert torch.allclose(x.std(0, unbiased=False).flatten(), torch.ones(6), atol=1e-4)
    again = TableData(train_file=str(path), n_train=50, seed=3).prepare()
    assert torch.equal(again.x_train, dm.x_train)  # seeded draw
    assert torch.equal(TableData(train_file=str(path), seed=9).prepare().x_test, dm.x_test)  # fixed split
    model = mlp(in_channels=6, image_size=1, num_classes=1, hidden=[16])
    assert model(dm.transform(dm.x_train, train=True)).shape == (50, 1)


def test_table_data_errors_name_the_column(tmp_path):
    from transfer_lab.errors import ConfigError
    from transfer_lab.data.tables import TableData, synthetic_table

    path = synthetic_table(tmp_path / "t.csv", n=20, d=2)
    with pytest.raises(ConfigError, match="target column 'price' not in"):
        TableData(train_file=str(path), target="price").prepare()
    with pytest.raises(ConfigError, match=r"feature column\(s\) \['rooms'\]"):
        TableData(train_file=str(path), features=["rooms"]).prepare()
    with pytest.raises(ConfigError, match="n_train=999"):
        TableData(train_file=str(path), n_train=999).prepare()


@pytest.mark.parametrize("name, key, value", [
    ("analysis_mnist", "target.data.samples_per_class", 100),
    ("analysis_cifar", "target.data.samples_per_class", 100),
    ("analysis_ranking", "source.data.image_size", 28),
    ("imbalance", "target.data.imbalance_ratio", 100),
])
def test_issue8_experiment_presets_compose(name, key, value):
    from omegaconf import OmegaConf

    cfg = compose_cfg(f"experiment={name}", tiny=False)
    assert OmegaConf.select(cfg, key) == value
