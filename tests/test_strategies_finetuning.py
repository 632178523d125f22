"""Behaviour of the fine-tuning family: discriminative, gradual_unfreeze, l2sp, adapter, lora, multitask
(adapter and lora alone: test_strategies_peft.py).

Local helpers (``pair``, ``batch``, ``make_module``, ``train_steps``) live in
tests/finetuning_helpers.py.
"""

import copy
import json

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from conftest import compose_cfg
from finetuning_helpers import batch, make_module, pair, train_steps
from transfer_lab.data import SyntheticData
from transfer_lab.errors import ConfigError
from transfer_lab.module import TransferModule
from transfer_lab.run import run
from transfer_lab.strategies.adapter import Adapter
from transfer_lab.strategies.discriminative import Discriminative
from transfer_lab.strategies.gradual_unfreeze import GradualUnfreeze
from transfer_lab.strategies.l2sp import L2SP
from transfer_lab.strategies.lora import LoRA
from transfer_lab.strategies.multitask import MultiTask


# --- which parameters train ---------------------------------------------------------------------
EXPECTED = {  # name predicate for the parameters that must (and alone may) receive gradients
    "discriminative": lambda n: True,
    "l2sp": lambda n: True,
    "multitask": lambda n: True,
    "gradual_unfreeze": lambda n: n.startswith("head."),  # epoch 0: head only
    "adapter": lambda n: n.startswith("head.") or ".adapter_" in n,
    "lora": lambda n: n.startswith("head.") or ".lora_" in n,
}
STRATEGY = {"discriminative": Discriminative, "l2sp": L2SP, "multitask": MultiTask,
            "gradual_unfreeze": GradualUnfreeze, "adapter": Adapter, "lora": LoRA}


@pytest.mark.parametrize("arch", ["convnet", "mlp"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_exact_set_of_parameters_receiving_gradients(name, arch):
    src, tgt, shape = pair(arch)
    strategy = STRATEGY[name]()
    model = strategy.build(src, tgt)
    before = copy.deepcopy(model.state_dict())
    batches = (lambda: (*batch(shape), batch(shape, k=4))) if name == "multitask" else None
    got, nonzero = train_steps(model, strategy, shape, steps=3, batches=batches)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if EXPECTED[name](n)}
    assert got == expected
    # zero-initialised factors pass no gradient to their partner at step 1; later steps do
    assert nonzero == expected
    # frozen means frozen: every other tensor, BatchNorm buffers included, is bit-identical
    after = model.state_dict()
    trained = {n for n in expected}
    trained_modules = {n.rsplit(".", 1)[0] for n in trained}
    for k, v in before.items():
        if k not in trained and k.rsplit(".", 1)[0] not in trained_modules:
            assert torch.equal(after[k], v), f"{name}: frozen {k} changed"
    if name in ("adapter", "lora", "gradual_unfreeze"):
        assert all(torch.equal(after[k], v) for k, v in before.items() if "running_" in k)


# --- discriminative -----------------------------------------------------------------------------
def test_discriminative_lrs_equal_the_configured_ladder():
    src, tgt, shape = pair("resnet")
    strategy = Discriminative(decay=0.5)
    model = strategy.build(src, tgt)
    opt = make_module(model, strategy, lr=0.08).configure_optimizers()
    got = {g["name"]: g["lr"] for g in opt.param_groups}
    # backbone.pool holds no parameters, so it is not a block and gets no group
    want = {"head": 0.08, "backbone.stage3": 0.04, "backbone.stage2": 0.02,
            "backbone.stage1": 0.01, "backbone.stem": 0.005}
    assert got == pytest.approx(want) and list(got) == list(want)
    for g in opt.param_groups:  # each group holds exactly its block's parameters
        assert {id(p) for p in g["params"]} == {id(p) for p in model.get_submodule(g["name"]).parameters()}
    assert strategy.report()["lr"] == pytest.approx(want)
    with pytest.raises(ConfigError, match="strategy.decay=1.5"):
        Discriminative(decay=1.5)


# --- L2-SP --------------------------------------------------------------------------------------
def test_l2sp_penalty_is_zero_at_the_source_and_its_gradient_matches_autograd():
    src, tgt, shape = pair()
    strategy = L2SP(alpha=0.3, beta=0.0)
    model = strategy.build(src, tgt)
    assert strategy.penalty(model).item() == 0.0  # at the source weights, no head term
    strategy.beta = 0.05
    head_sq = sum(p.pow(2).sum() for p in model.head.parameters())
    assert strategy.penalty(model).item() == pytest.approx(0.5 * 0.05 * head_sq.item())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.zero_grad()
    strategy.penalty(model).backward()
    for n, p in model.named_parameters():
        ref = strategy.reference.get(n)
        want = 0.3 * (p - ref) if ref is not None else 0.05 * p
        torch.testing.assert_close(p.grad, want.detach(), rtol=1e-5, atol=1e-7, msg=n)
    # the penalty replaces weight decay, whatever the optimizer says
    assert all(g["weight_decay"] == 0.0 for g in strategy.param_groups(model, 0.1))


def l2sp_drift(alpha: float) -> float:
    src, tgt, shape = pair()
    strategy = L2SP(alpha=alpha, beta=0.0)
    model = strategy.build(src, tgt)
    torch.manual_seed(3)
    train_steps(model, strategy, shape, steps=5)
    return strategy.report()["distance_to_source"]


def test_l2sp_pulls_toward_the_source():
    """Same data, same steps: with a strong alpha the backbone drifts less than without."""
    assert 0 < l2sp_drift(5.0) < l2sp_drift(0.0)


# --- multitask ------------------------------------------------------------------------------------
def test_multitask_loss_is_the_weighted_sum_of_both_tasks():
    src, tgt, shape = pair()
    strategy = MultiTask(source_weight=0.3, target_weight=2.0)
    model = strategy.build(src, tgt)
    module = make_module(model, strategy)
    module.eval()  # no BatchNorm batch statistics: per-task forwards equal the joint forward
    (xt, yt), (xs, ys) = batch(shape), batch(shape, k=4)
    loss = module.training_step((xt, yt, (xs, ys)), 0)
    want_t, want_s = 2.0 * F.cross_entropy(model(xt), yt), 0.3 * F.cross_entropy(model.forward_source(xs), ys)
    torch.testing.assert_close(loss, want_t + want_s)
    terms = strategy.loss(model, (xt, yt, (xs, ys)), module.task_loss).terms
    torch.testing.assert_close(terms["task"], want_t)  # logged as train/task and train/source
    torch.testing.assert_close(terms["source"], want_s)
    torch.testing.assert_close(model.forward_source(xs), src.eval()(xs), rtol=0, atol=1e-6)


def test_multitask_run_reports_both_tasks(tmp_path):
    cfg = compose_cfg("strategy=multitask", "target.data.classes=[0,1,2]", store=tmp_path / "store")
    res = run(cfg, tmp_path / "out", {"strategy": "multitask"})
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    src_task = saved["strategy_report"]["source_task"]
    assert 0.0 <= src_task["test/acc"] <= 1.0 and src_task["test/loss"] > 0
    assert saved["metrics"]["test/acc"] == res["metrics"]["test/acc"]
    assert saved["data"]["target"]["classes"] == [0, 1, 2]  # test/acc is the 3-class target's


# --- gradual unfreezing (Lightning BaseFinetuning), including resume -----------------------------
class Recorder(L.Callback):
    """Per epoch, at its first batch: the trainable parameter names and the optimizer groups."""

    def __init__(self):
        self.trainable, self.groups = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        e = trainer.current_epoch
        if e not in self.trainable:
            names = {id(p): n for n, p in pl_module.model.named_parameters()}
            self.trainable[e] = {n for n, p in pl_module.model.named_parameters() if p.requires_grad}
            self.groups[e] = [(g.get("name"), g["lr"], sorted(names[id(p)] for p in g["params"]))
                              for g in trainer.optimizers[0].param_groups]


def gu_fit(max_epochs, ckpt_path=None, save_to=None, test=False):
    src, tgt, _ = pair()
    strategy = GradualUnfreeze(start=1, every=1, lr_ratio=0.5)
    model = strategy.build(src, tgt)
    module = TransferModule(model, strategy, lambda g: torch.optim.Adam(g, lr=0.01), lr=0.01,
                            num_classes=3)
    dm = SyntheticData(num_classes=3, shape=(1, 12, 12), n_train=24, n_test=8, batch_size=8)
    rec = Recorder()
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[*strategy.callbacks(), rec])
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    if save_to:
        trainer.save_checkpoint(save_to)
    if test:
        trainer.test(module, datamodule=dm, verbose=False)
    return rec, trainer, module


@pytest.mark.slow
def test_gradual_unfreeze_trainable_set_per_epoch_and_after_resume(tmp_path):
    full, trainer, module = gu_fit(4, test=True)
    head = {"head.weight", "head.bias"}
    conv = {b: {n for n, _ in module.model.named_parameters() if n.startswith(f"backbone.{b}.")}
            for b in ("conv1", "conv2")}
    assert full.trainable == {0: head, 1: head | conv["conv2"], 2: head | conv["conv2"] | conv["conv1"],
                              3: head | conv["conv2"] | conv["conv1"]}
    assert [(g[0], g[1]) for g in full.groups[3]] == [("all", 0.01), ("backbone.conv2", 0.005),
                                                      ("backbone.conv1", 0.005)]
    # trainer.test() after fit must not re-freeze what trained (the run saves weights after it)
    assert all(p.requires_grad for p in module.model.parameters())
    assert module.strategy.report()["trainable_at_end"] == sum(p.numel() for p in module.model.parameters())

    # stop after epoch 2 (both blocks unfrozen), resume in a fresh process-like setup to epoch 4
    ckpt = tmp_path / "gu.ckpt"
    gu_fit(2, save_to=ckpt)
    resumed, trainer2, _ = gu_fit(4, ckpt_path=str(ckpt))
    assert sorted(resumed.trainable) == [2, 3]
    for e in (2, 3):
        assert resumed.trainable[e] == full.trainable[e]
        assert resumed.groups[e] == full.groups[e]
    # the optimizer state came back with the groups: Adam step counts equal the uninterrupted run's
    steps = lambda t: sorted(float(s["step"]) for s in t.optimizers[0].state_dict()["state"].values())
    assert steps(trainer2) == steps(trainer)
