"""K seeds trained as one vectorised model equal K separate ``TransferModule`` runs, seed by seed.

The reference is the real path (``TransferModule`` on a Lightning ``Trainer``, as ``run.py``
trains a cell); each seed has its own source, labelled subset, initialisation and batch order.
Local helpers (``cell``, ``separate``, ``vectorised``) live here, not in conftest.py.
"""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from transfer_lab.data import SyntheticData
from transfer_lab.models.backbones import convnet, mlp
from transfer_lab.module import TransferModule
from transfer_lab.vectorized import NotVectorisable, check_group, fit_seeds, vectorizable

CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy"
STRATEGIES = sorted(p.stem for p in CONF.glob("*.yaml"))
SEEDS = (0, 1, 2)
EPOCHS = 6  # 3 batches per epoch: 18 optimizer steps
ATOL = 1e-5
DATA: dict = {}  # extra SyntheticData arguments (tests set them with monkeypatch)


def strategy_of(name: str, **over):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return instantiate(OmegaConf.merge(cfg, over))


def tiny_model(arch: str, num_classes: int = 4):
    if arch == "mlp":  # BatchNorm1d: per-seed statistics under vmap
        return mlp(1, 8, num_classes, hidden=(16, 12), batch_norm=True)
    if arch == "mlp_dropout":
        return mlp(1, 8, num_classes, hidden=(16,), dropout=0.5)
    return convnet(1, 8, num_classes, channels=(4, 6))


def cell(name: str, seed: int, arch: str = "cnn", **over):
    """One seed's (strategy, built model, target data): its own source init, subset and order."""
    strategy = strategy_of(name, **over)
    dm = SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=12, n_test=10, batch_size=16,
                       eval_batch_size=16, seed=seed, **DATA).prepare()
    L.seed_everything(1000 + seed, verbose=False)
    source = tiny_model(arch) if strategy.needs_source else None
    if source is not None:  # seed-specific BatchNorm statistics, as a trained source has
        with torch.no_grad():
            source.train()(torch.randn(8, 1, 8, 8))
    L.seed_everything(seed, verbose=False)
    return strategy, strategy.build(source, tiny_model(arch)), dm


def trainer(**kw) -> L.Trainer:
    return L.Trainer(**{"max_epochs": EPOCHS, "accelerator": "cpu", "devices": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "num_sanity_val_steps": 0, **kw})


OPT = functools.partial(torch.optim.Adam, lr=0.01)


def separate(name: str, seed: int, arch: str = "cnn", trainer_kw=None, **over):
    """The reference: one seed on ``TransferModule``, as run.py trains a cell."""
    strategy, model, dm = cell(name, seed, arch, **over)
    module = TransferModule(model, strategy, OPT, lr=0.01, num_classes=dm.num_classes,
                            class_weights=dm.class_weights)
    t = trainer(**(trainer_kw or {}))
    t.fit(module, datamodule=strategy.datamodule(dm, None))
    fitted = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith(("val/", "train/"))}
    tested = t.test(module, datamodule=dm, verbose=False)[0]
    return model, {**fitted, **{k: float(v) for k, v in tested.items()}}, module.test_per_class


def vectorised(name: str, arch: str = "cnn", trainer_kw=None, **over):
    strategies, models, dms = zip(*(cell(name, s, arch, **over) for s in SEEDS))
    return fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01, trainer(**(trainer_kw or {})))


def assert_same(name, results, arch="cnn", trainer_kw=None, **over):
    for seed, res in zip(SEEDS, results):
        model, metrics, per_class = separate(name, seed, arch, trainer_kw, **over)
        want, got = model.state_dict(), res.model.state_dict()
        assert want.keys() == got.keys()
        for k in want:
            assert torch.allclose(want[k].double(), got[k].double(), atol=ATOL), f"seed {seed}: {k}"
        assert metrics.keys() == res.metrics.keys(), f"seed {seed}"
        for k, v in metrics.items():
            assert res.metrics[k] == pytest.approx(v, abs=ATOL), f"seed {seed}: {k}"
        assert res.per_class == pytest.approx(per_class, abs=ATOL)


VECTORISED = [n for n in STRATEGIES if vectorizable(strategy_of(n))[0]]


def test_the_issue_s_strategies_are_vectorised():
    assert {"scratch", "finetune", "linear_probe", "partial", "discriminative", "l2sp", "adapter",
            "lora", "distill"} <= set(VECTORISED)


@pytest.mark.slow
@pytest.mark.parametrize("name", VECTORISED)
def test_k_vectorised_seeds_equal_k_separate_runs(name):
    assert_same(name, vectorised(name))


@pytest.mark.slow
def test_batchnorm_of_a_frozen_backbone_trains_with_train_bn_as_in_separate_runs():
    # adapter freezes the backbone; train_bn=True keeps its BatchNorm statistics updating (per seed)
    assert_same("adapter", vectorised("adapter", train_bn=True), train_bn=True)


@pytest.mark.slow
def test_per_seed_gradient_clipping_equals_separate_clipping():
    # a small norm: every step clips, and each seed by its own norm (a global norm over the K
    # seeds would scale them all alike and fail here)
    kw = {"gradient_clip_val": 0.05}
    assert_same("finetune", vectorised("finetune", trainer_kw=kw), trainer_kw=kw)


@pytest.mark.slow
def test_mlp_with_batchnorm1d_and_sgd_momentum_equals_separate_runs():
    global OPT
    saved, OPT = OPT, functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=1e-3)
    try:
        assert_same("partial", vectorised("partial", arch="mlp", freeze_transferred=False), arch="mlp",
                    freeze_transferred=False)
    finally:
        OPT = saved


def test_frozen_batchnorm_statistics_stay_put_per_seed():
    strategies, models, dms = zip(*(cell("linear_probe", s) for s in SEEDS))
    before = [{k: v.clone() for k, v in m.state_dict().items() if "running" in k} for m in models]
    fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01, trainer(max_steps=2))
    for b, m in zip(before, models):
        assert b and all(torch.equal(v, m.state_dict()[k]) for k, v in b.items())
    # the seeds' statistics differ (each its own source), so a mix-up would show
    assert not torch.equal(before[0]["backbone.conv1.1.running_mean"], before[1]["backbone.conv1.1.running_mean"])


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - set(VECTORISED)))
def test_other_strategies_say_why_and_refuse(name):
    strategy = strategy_of(name)
    ok, why = vectorizable(strategy)
    assert not ok and type(strategy).__name__ in why
    with pytest.raises(NotVectorisable) as e:
        check_group([strategy, strategy], [None, None])
    assert str(e.value) == why


def test_distill_with_hints_is_not_vectorised():
    ok, why = vectorizable(strategy_of("distill", hints=[["backbone.conv1", "backbone.conv1"]]))
    assert not ok and "hints" in why


def test_non_elementwise_optimizer_is_not_vectorised():
    assert not vectorizable(strategy_of("finetune"), torch.optim.LBFGS)[0]
    assert vectorizable(strategy_of("finetune"), "torch.optim.AdamW")[0]


def test_unequal_training_sets_refuse_before_training():
    strategies, models, dms = zip(*(cell("finetune", s) for s in SEEDS[:2]))
    small = SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=12, n_test=10, batch_size=16,
                          samples_per_class=5, seed=1).prepare()
    with pytest.raises(NotVectorisable, match="differ"):
        fit_seeds(list(models), list(strategies), [dms[0], small], OPT, 0.01, trainer())


@pytest.mark.slow
def test_a_group_resumed_from_its_checkpoint_equals_an_uninterrupted_one(tmp_path):
    def fit(**kw):
        strategies, models, dms = zip(*(cell("finetune", s) for s in SEEDS[:2]))
        ckpt = kw.pop("ckpt_path", None)
        fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01, trainer(**kw), ckpt_path=ckpt)
        return models

    last = ModelCheckpoint(dirpath=tmp_path, filename="last", save_top_k=1, monitor=None,
                           enable_version_counter=False)
    fit(max_epochs=2, callbacks=[last], enable_checkpointing=True)
    resumed = fit(max_epochs=4, ckpt_path=str(tmp_path / "last.ckpt"))
    straight = fit(max_epochs=4)
    for r, s in zip(resumed, straight):
        for k, v in s.state_dict().items():
            assert torch.allclose(r.state_dict()[k].double(), v.double(), atol=1e-6), k


@pytest.mark.slow
def test_bench_throughput_reports_both_sides_per_k():
    from transfer_lab.vectorized.bench import seeds_throughput

    def data(seed):
        return SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=8, n_test=4, batch_size=8,
                             val_fraction=0.0, seed=seed).prepare()

    out = seeds_throughput("mlp", ks=(1, 2), epochs=1, repeats=1, data=data)
    assert sorted(out) == [1, 2]
    for r in out.values():
        assert r["vectorised_ips"] > 0 and r["separate_ips"] > 0
        assert r["speedup"] == pytest.approx(r["vectorised_ips"] / r["separate_ips"], rel=0.01)


def test_bench_pairs_alternate_and_the_speedup_is_the_median_paired_ratio(monkeypatch):
    import transfer_lab.vectorized.bench as vb

    calls, times = [], {"v": iter([1.0, 2.0, 4.0]), "s": iter([2.0, 2.0, 2.0])}
    monkeypatch.setattr(vb, "time_vectorised", lambda *a: calls.append("v") or next(times["v"]))
    monkeypatch.setattr(vb, "time_separate", lambda *a: calls.append("s") or next(times["s"]))

    def data(seed):
        return SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=8, n_test=4, batch_size=8,
                             val_fraction=0.0, seed=seed).prepare()

    out = vb.seeds_throughput("mlp", ks=(2,), epochs=1, repeats=3, data=data)[2]
    assert calls == ["v", "s", "s", "v", "v", "s"]  # who goes first alternates
    assert out["ratios"] == [2.0, 1.0, 0.5] and out["speedup"] == 1.0  # median of the pairs


@pytest.mark.slow
def test_class_weighted_loss_per_seed_equals_separate_runs(monkeypatch):
    monkeypatch.setitem(DATA, "imbalance_ratio", 3.0)
    monkeypatch.setitem(DATA, "imbalance_remedy", "reweight")
    assert cell("finetune", 0)[2].class_weights is not None
    assert_same("finetune", vectorised("finetune"))


def test_one_lightning_step_trains_every_seed():
    strategies, models, dms = zip(*(cell("scratch", s) for s in SEEDS))
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    t = trainer(max_steps=1, limit_val_batches=0)
    fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01, t, test=False)
    assert t.global_step == 1
    for b, m in zip(before, models):
        assert m.state_dict()["backbone.conv1.1.num_batches_tracked"] == 1
        assert not torch.equal(b["head.weight"], m.state_dict()["head.weight"])


def test_dropout_draws_are_each_seed_s_own():
    # two identical seeds (same init, data and order): only the dropout masks can tell them apart
    strategies, models, dms = zip(*(cell("scratch", 0, "mlp_dropout") for _ in range(2)))
    assert torch.equal(models[0].head.weight, models[1].head.weight)
    fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01,
              trainer(max_steps=2, limit_val_batches=0), test=False)
    assert not torch.equal(models[0].head.weight, models[1].head.weight)
