"""The strategy protocol: what TransferModule owns, what a strategy declares, and the import rules."""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from transfer_lab.data import SyntheticData
from transfer_lab.models import convnet, mlp
from transfer_lab.module import TransferModule
from transfer_lab.strategies.base import Loss, Strategy
from transfer_lab.strategies.dann import DANN
from transfer_lab.strategies.gradual_unfreeze import GradualUnfreeze
from transfer_lab.strategies.linear_probe import LinearProbe
from transfer_lab.strategies.partial import Partial

STRATEGY_DIR = Path(__file__).resolve().parents[1] / "transfer_lab" / "strategies"
SHARED = {"base", "common", "peft_layers"}  # not strategies: what every strategy may import
STRATEGY_FILES = sorted(p for p in STRATEGY_DIR.glob("*.py") if p.stem not in SHARED | {"__init__"})


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, including imports under ``if TYPE_CHECKING``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
    return out


@pytest.mark.parametrize("path", STRATEGY_FILES, ids=lambda p: p.stem)
def test_no_strategy_imports_another_strategy_or_the_module(path):
    bad = {m for m in imported_modules(path)
           if (m.startswith("transfer_lab.strategies.") and m.rsplit(".", 1)[1] not in SHARED)
           or m in ("transfer_lab.module", "transfer_lab.run")}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("name", sorted(SHARED))
def test_shared_strategy_pieces_do_not_import_the_module(name):
    """The module imports strategies.base; nothing in that layer imports the module back."""
    assert "transfer_lab.module" not in imported_modules(STRATEGY_DIR / f"{name}.py")


def test_a_strategy_without_build_fails_naming_the_hook():
    class Empty(Strategy):
        pass

    with pytest.raises(NotImplementedError, match=r"Empty must override build\(source, target\)"):
        Empty().build(None, convnet(1, 8, 3, channels=[4]))


class Doubled(Strategy):
    """Test strategy: the task loss plus a second named term (the same loss, weighted 0.5).

    The outputs it hands the train metric are the labels, one-hot: the train accuracy is 1 exactly
    when the module scores ``Loss.outputs``."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Linear(2, 2)

    def build(self, source, target):
        return target

    def modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"extra": self.extra})

    def loss(self, model, batch, task_loss):
        x, y = batch
        out = model(x)
        terms = {"task": task_loss(out, y), "half": 0.5 * task_loss(out, y)
                 + 0 * self.extra.weight.sum()}
        return Loss(terms, F.one_hot(y, 3).float() * 10, y)


def fit_tiny(strategy: Strategy, model: nn.Module, epochs: int = 1) -> tuple[TransferModule, L.Trainer]:
    module = TransferModule(model, strategy, lambda g: torch.optim.SGD(g, lr=0.05), lr=0.05,
                            num_classes=3)
    dm = SyntheticData(num_classes=3, shape=(1, 8, 8), n_train=24, n_test=8, batch_size=8)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, limit_val_batches=0,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=strategy.callbacks())
    trainer.fit(module, datamodule=dm)
    return module, trainer


def test_module_sums_and_logs_named_terms_and_scores_the_train_metric():
    torch.manual_seed(0)
    strategy = Doubled()
    module, trainer = fit_tiny(strategy, convnet(1, 8, 3, channels=[4]))
    m = trainer.callback_metrics
    assert float(m["train/loss"]) == pytest.approx(float(m["train/task"]) * 1.5, rel=1e-5)
    assert float(m["train/half"]) == pytest.approx(float(m["train/task"]) * 0.5, rel=1e-5)
    assert float(m["train/acc"]) == 1.0  # the module updated its metric from Loss.outputs


def test_declared_modules_are_registered_optimised_and_checkpointed():
    torch.manual_seed(0)
    strategy = Doubled()
    module = TransferModule(convnet(1, 8, 3, channels=[4]), strategy, torch.optim.SGD, lr=0.1,
                            num_classes=3)
    assert module.strategy_modules["extra"] is strategy.extra
    assert "strategy_modules.extra.weight" in module.state_dict()
    opt = module.configure_optimizers()
    optimised = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in optimised for p in strategy.extra.parameters())
    assert all(id(p) in optimised for p in module.model.parameters())


def test_dann_declares_its_domain_classifier_once():
    torch.manual_seed(0)
    src, tgt = convnet(1, 8, 3, channels=[4]), convnet(1, 8, 3, channels=[4])
    strategy = DANN(hidden=5)
    model = strategy.build(src, tgt)
    module = TransferModule(model, strategy, torch.optim.SGD, lr=0.1, num_classes=3)
    adversary = module.strategy_modules["domain_adversary"]
    assert adversary is strategy.adversary
    xs, xt = torch.randn(4, 1, 8, 8), torch.randn(3, 1, 8, 8)
    out = strategy.loss(model, (xs, torch.randint(0, 3, (4,)), xt), module.task_loss)
    assert set(out.terms) == {"task", "domain"} and out.outputs.shape == (4, 3)
    out.terms["domain"].backward()
    assert all(p.grad is not None for p in adversary.parameters())


# --- frozen means frozen: BatchNorm and Dropout held in eval mode, in a real fit ------------------
def dropout_mlp():
    torch.manual_seed(0)
    return mlp(1, 8, 3, hidden=[16, 16], dropout=0.5, batch_norm=True)


FROZEN = {  # strategy factory, epochs: each freezes part of dropout_mlp (fc1 and/or fc2)
    "linear_probe": (lambda bn: LinearProbe(train_bn=bn), 2),
    "partial": (lambda bn: Partial(blocks=1, train_bn=bn), 2),
    # fc2 unfrozen at epoch 1, fc1 at epoch 2: the rule must hold before and after each unfreeze
    "gradual_unfreeze": (lambda bn: GradualUnfreeze(start=1, every=1, train_bn=bn), 3),
}


class ModeRecorder(L.Callback):
    """At each training batch: per backbone block whether it is fully frozen, the modes of its
    BatchNorm and Dropout layers, its BatchNorm running means, and whether it gives the same
    output twice on the batch (in training mode, on a copy so the probe moves no statistics)."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        backbone = copy.deepcopy(pl_module.model.backbone)
        h, rec = batch[0], {}
        for name, block in backbone.named_children():
            frozen = any(True for _ in block.parameters()) and not any(
                p.requires_grad for p in block.parameters())
            norms = [m for m in block.modules() if isinstance(m, nn.BatchNorm1d)]
            rec[name] = {"frozen": frozen, "bn": [m.training for m in norms],
                         "mean": [m.running_mean.clone() for m in norms],  # before the probe runs
                         "dropout": [m.training for m in block.modules() if isinstance(m, nn.Dropout)]}
            with torch.no_grad():
                h, again = block(h), block(h)
            rec[name]["same_twice"] = torch.equal(h, again)
        self.batches.append(rec)


@pytest.mark.parametrize("train_bn", [False, True])
@pytest.mark.parametrize("name", list(FROZEN))
def test_frozen_parts_are_in_eval_mode_in_training(name, train_bn):
    """Through trainer.fit with a validation loop every epoch (and the sanity check): frozen blocks
    have Dropout off and BatchNorm in training mode (statistics moving) only with ``train_bn``;
    what trains is in training mode."""
    make, epochs = FROZEN[name]
    strategy = make(train_bn)
    module = TransferModule(strategy.build(dropout_mlp(), dropout_mlp()), strategy,
                            lambda g: torch.optim.SGD(g, lr=0.05), lr=0.05, num_classes=3)
    dm = SyntheticData(num_classes=3, shape=(1, 8, 8), n_train=30, n_test=8, batch_size=8,
                       val_fraction=0.2)
    rec = ModeRecorder()
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, num_sanity_val_steps=1,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[*strategy.callbacks(), rec])
    trainer.fit(module, datamodule=dm)
    assert trainer.num_val_batches[0] > 0  # validation loops ran between the recorded epochs
    seen = set()
    for now, after in zip(rec.batches, rec.batches[1:]):
        for block, r in now.items():
            if not r["bn"]:
                continue  # flatten
            seen.add((block, r["frozen"]))
            moved = [not torch.equal(a, b) for a, b in zip(r["mean"], after[block]["mean"])]
            if r["frozen"]:
                assert r["bn"] == [train_bn] and r["dropout"] == [False], (block, r)
                assert r["same_twice"], block  # a fixed feature extractor: no Dropout masks
                assert moved == [train_bn], block  # statistics move only if asked
            else:
                assert r["bn"] == [True] and r["dropout"] == [True], (block, r)
                assert moved == [True], block
    assert ("fc1", True) in seen  # every strategy here freezes fc1 for a while
    if name == "gradual_unfreeze":
        assert {("fc1", False), ("fc2", False), ("fc2", True)} <= seen
