"""Strategies across networks: distillation, weight transfer, DANN and its source-only baseline."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import compose_cfg
from hydra.utils import instantiate

from transfer_lab.data.loader import normalize
from transfer_lab.module import TransferModule
from transfer_lab.builders import build_model, make_trainer
from transfer_lab.run import prepare, run
from transfer_lab.source_stage import source_stage
from transfer_lab.strategies.common import GradientReversal, grl_lambda
from transfer_lab.strategies.distill import Distill, kd_loss


def fit(tmp_path, *overrides: str, before_fit=None):
    """What ``run`` does up to ``trainer.fit``, keeping the strategy and modules for inspection."""
    cfg = compose_cfg(*overrides, store=tmp_path / "store")
    p = prepare(cfg)
    strategy, source_dm, target_dm, model_cfg = p.strategy, p.source_dm, p.target_dm, p.target_model_cfg
    source, _ = source_stage(cfg, strategy, source_dm)
    torch.manual_seed(cfg.seed)
    model = strategy.build(source, build_model(model_cfg, target_dm))
    module = TransferModule(model, strategy, instantiate(cfg.target.optimizer, _partial_=True),
                            lr=float(cfg.target.optimizer.lr), num_classes=target_dm.num_classes)
    dm = strategy.datamodule(target_dm, source_dm)
    if before_fit is not None:
        before_fit(strategy, module, dm, target_dm)
    trainer = make_trainer(cfg, "target", tmp_path / "out", strategy.callbacks())
    trainer.fit(module, datamodule=dm)
    return strategy, module, source, target_dm


def _state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# --- distillation ---------------------------------------------------------------------------
def test_kd_loss_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    t = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    temp = 2.0
    expected = 0.0
    for zs, zt in zip(s.tolist(), t.tolist()):
        ps = [math.exp(v / temp) for v in zs]
        pt = [math.exp(v / temp) for v in zt]
        ps = [v / sum(ps) for v in ps]
        pt = [v / sum(pt) for v in pt]
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = expected / 2 * temp ** 2
    assert kd_loss(s, t, temp).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_kd_loss_is_zero_for_identical_logits(temperature):
    z = torch.randn(8, 10) * 5
    assert abs(kd_loss(z, z.clone(), temperature).item()) < 1e-6
    assert kd_loss(z, torch.randn(8, 10), temperature).item() > 0


def test_distill_teacher_frozen_regressors_trained(tmp_path):
    """Teacher weights *and* buffers (BatchNorm statistics) unchanged; hint regressors train."""
    snap = {}

    def before(strategy, module, dm, target_dm):
        snap["teacher"] = _state(strategy.teacher)
        snap["regressors"] = _state(strategy.regressors)
        snap["student"] = _state(module.model)

    strategy, module, source, _ = fit(
        tmp_path, "strategy=distill", "strategy.hints=[[backbone.conv1,backbone.conv2]]",
        "strategy.attention=[[backbone.conv2,backbone.conv2]]",
        "model@target.model=convnet", "target.model.channels=[4,6,6]", before_fit=before)
    assert module.strategy_modules["regressors"] is strategy.regressors  # registered → optimised
    for k, v in _state(strategy.teacher).items():
        assert torch.equal(v, snap["teacher"][k]), f"teacher {k} changed"
    assert not strategy.teacher.training
    assert any(not torch.equal(v, snap["regressors"][k]) for k, v in _state(strategy.regressors).items())
    assert any(not torch.equal(v, snap["student"][k]) for k, v in _state(module.model).items())
    assert "backbone.conv3.0.weight" in module.model.state_dict()  # a different architecture


def _identity(reg: torch.nn.Module) -> None:
    with torch.no_grad():
        reg.weight.zero_()
        idx = torch.arange(reg.weight.shape[0])
        if reg.weight.ndim == 4:
            reg.weight[idx, idx, 0, 0] = 1.0
        else:
            reg.weight[idx, idx] = 1.0
        reg.bias.zero_()


@pytest.mark.parametrize("arch, path, kind", [
    ("mlp", "backbone.fc1.0", "hints"), ("lenet", "backbone.conv2.0", "hints"),
    ("lenet", "backbone.conv2.0", "attention")])
def test_features_before_an_inplace_relu_compare_like_with_like(arch, path, kind):
    """Student = teacher and an identity regressor: the hint/attention term must be 0. A capture
    that is not cloned hands over the in-place ReLU's output on the student side only."""
    from transfer_lab.models import lenet, mlp

    make = {"mlp": lambda: mlp(1, 12, 3, hidden=[8, 8]), "lenet": lambda: lenet(1, 12, 3)}[arch]
    torch.manual_seed(0)
    teacher = make()
    student = make()
    student.load_state_dict(teacher.state_dict())
    d = Distill(kd_weight=0.0, ce_weight=0.0, **{kind: [[path, path]]})
    model = d.build(teacher, student)
    if kind == "hints":
        _identity(d.regressors["hint0"])
    x, y = torch.randn(6, 1, 12, 12), torch.randint(0, 3, (6,))
    term = d.loss(model, (x, y), lambda out, t: F.cross_entropy(out, t)).terms
    value = term["hint" if kind == "hints" else "at"]
    assert float(value) == pytest.approx(0.0, abs=1e-10)
    assert value.requires_grad  # the clone keeps the student's graph


def test_teacher_input_converts_channels_size_and_statistics():
    from transfer_lab.models import convnet

    d = Distill()
    d.build(convnet(3, 16, 4, channels=(4,)), convnet(1, 16, 4, channels=(4,)))
    u8 = torch.randint(0, 256, (2, 1, 16, 16), dtype=torch.uint8)
    t_mean, t_std = torch.tensor([0.2]), torch.tensor([0.3])
    s_mean, s_std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    d.stats = {"t_mean": t_mean, "t_std": t_std, "s_mean": s_mean, "s_std": s_std}
    got = d.teacher_input(normalize(u8, t_mean, t_std))
    torch.testing.assert_close(got, normalize(u8.repeat(1, 3, 1, 1), s_mean, s_std), atol=1e-5, rtol=0)
    d.stats = {"t_mean": s_mean, "t_std": s_std, "s_mean": s_mean, "s_std": s_std}
    x = torch.randn(2, 3, 16, 16)
    d.build(convnet(3, 16, 4, channels=(4,)), convnet(3, 16, 4, channels=(4,)))
    assert d.teacher_input(x) is x  # same shape and statistics: untouched
    d.build(convnet(3, 8, 4, channels=(4,)), convnet(3, 16, 4, channels=(4,)))
    assert d.teacher_input(x).shape == (2, 3, 8, 8)


def test_distill_across_input_shapes_runs_end_to_end(tmp_path):
    cfg = compose_cfg("strategy=distill", "target.data.channels=3", "target.data.image_size=12",
                      "model@target.model=mlp", "target.model.hidden=[16]", "target.epochs=1",
                      store=tmp_path / "store")
    res = run(cfg, tmp_path / "out")
    assert res["status"] == "ok" and res["data"]["target"]["input_shape"] == [3, 12, 12]
    assert res["strategy_report"]["params"]["student"] == res["params"]["total"]


# --- weight transfer ------------------------------------------------------------------------
def test_weight_transfer_identical_architectures_copies_everything(tmp_path):
    cfg = compose_cfg("strategy=weight_transfer", "strategy.include_head=true", "target.epochs=0",
                      store=tmp_path / "store")
    res = run(cfg, tmp_path / "out")
    rows = res["strategy_report"]["layers"]
    assert rows and all(r["action"] == "copied" and r["source"] == r["layer"] for r in rows)
    assert res["strategy_report"]["summary"] == {"copied": len(rows), "adapted": 0, "reinitialised": 0}


def test_weight_transfer_reports_each_layer_of_a_different_architecture(tmp_path):
    cfg = compose_cfg("strategy=weight_transfer", "strategy.widen=[[backbone.conv1.0,16]]",
                      "strategy.deepen=[backbone.conv2]", "model@target.model=convnet",
                      "target.model.channels=[16,32,16]", "target.epochs=0",
                      store=tmp_path / "store")
    res = run(cfg, tmp_path / "out")  # source tiny_cnn: conv 8, 16
    rows = {r["layer"]: r for r in res["strategy_report"]["layers"]}
    assert {k: r["action"] for k, r in rows.items()} == {
        "backbone.conv1.0": "copied", "backbone.conv1.1": "copied",       # widened to 16
        "backbone.conv2.0": "adapted", "backbone.conv2.1": "adapted",     # 16 → 32 channels
        "backbone.conv3.0": "adapted", "backbone.conv3.1": "copied",      # ← conv2_deeper (16x16)
        "head": "reinitialised"}
    assert rows["backbone.conv3.0"]["source"] == "backbone.conv2_deeper.0"
    assert rows["backbone.conv2.0"]["source_shape"]["weight"] == [16, 16, 3, 3]
    assert rows["backbone.conv2.0"]["target_shape"]["weight"] == [32, 16, 3, 3]


# --- domain adaptation ----------------------------------------------------------------------
def test_gradient_reversal_flips_the_gradient_sign():
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    (GradientReversal(0.7)(x) * w).sum().backward()
    torch.testing.assert_close(x.grad, -0.7 * w)
    assert torch.equal(GradientReversal(0.7)(x), x)
    assert grl_lambda(0.0) == 0.0 and grl_lambda(1.0) == pytest.approx(1.0, abs=1e-4)
    assert 0 < grl_lambda(0.1) < grl_lambda(0.5) < 1


def _dann_weights(tmp_path, poison: bool, strategy: str = "dann") -> tuple[dict, list]:
    seen: list = []

    def before(strat, module, dm, target_dm):
        target_dm.prepare()
        if poison:  # any read of these as labels fails (-1 is no class) or changes the result
            target_dm.y_train = torch.full_like(target_dm.y_train, -1)
        inner = dm.on_after_batch_transfer

        def spy(batch, idx):
            if dm.trainer.training:
                seen.append(tuple(t.clone() for t in batch))
            return inner(batch, idx)
        dm.on_after_batch_transfer = spy

    _, module, _, target_dm = fit(tmp_path, f"strategy={strategy}", "target.data.noise=0.6",
                                  "target.data.data_seed=3", before_fit=before)
    return _state(module.model), seen, target_dm


@pytest.mark.slow
def test_dann_never_reads_target_labels(tmp_path):
    clean, batches, target_dm = _dann_weights(tmp_path / "a", poison=False)
    poisoned, _, _ = _dann_weights(tmp_path / "b", poison=True)
    for k in clean:  # training does not depend on the target training labels at all
        assert torch.equal(clean[k], poisoned[k]), k
    # the data path: (source images, source labels, target images), never target labels
    xt_pool = {tuple(img.flatten().tolist()) for img in target_dm.x_train.cpu()}
    assert batches and all(len(b) == 3 for b in batches)
    assert all(tuple(img.flatten().tolist()) in xt_pool for img in batches[0][2])
    assert batches[0][2].dtype == torch.uint8 and batches[0][1].dtype == torch.long


def test_source_only_trains_on_source_batches_only(tmp_path):
    _, batches, target_dm = _dann_weights(tmp_path, poison=True, strategy="source_only")
    xt_pool = {tuple(img.flatten().tolist()) for img in target_dm.x_train.cpu()}
    assert batches and all(len(b) == 2 for b in batches)
    assert not any(tuple(img.flatten().tolist()) in xt_pool for img in batches[0][0])


def test_dann_evaluates_on_the_target_test_set(tmp_path):
    cfg = compose_cfg("strategy=dann", "target.epochs=1", store=tmp_path / "store")
    res = run(cfg, tmp_path / "out")
    assert res["status"] == "ok" and 0.0 <= res["metrics"]["test/acc"] <= 1.0
    assert res["strategy_report"]["final_grl_lambda"] > 0
    assert res["data"]["target"]["n_test"] == 128  # the target test split (synthetic: 4 classes × 32)
