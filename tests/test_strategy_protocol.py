"""The strategy protocol: what TransferModule owns, what a strategy declares, and the import rules."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch
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
    """Test strategy: the task loss plus a second named term (the same loss, weighted 0.5)."""

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
        return Loss(terms, out, y)


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
    assert 0.0 <= float(m["train/acc"]) <= 1.0  # the module updated its metric from Loss.outputs


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


# --- frozen means frozen: BatchNorm and Dropout held in eval mode ---------------------------------
def dropout_mlp(batch_norm: bool = True):
    torch.manual_seed(0)
    return mlp(1, 8, 3, hidden=[16, 16], dropout=0.5, batch_norm=batch_norm)


FROZEN = {  # strategy factory → module path of a part it freezes (holding BatchNorm and Dropout)
    "linear_probe": (lambda bn: LinearProbe(train_bn=bn), "backbone"),
    "partial": (lambda bn: Partial(blocks=1, train_bn=bn), "backbone.fc1"),
    "gradual_unfreeze": (lambda bn: GradualUnfreeze(start=5, train_bn=bn), "backbone"),
}


@pytest.mark.parametrize("train_bn", [False, True])
@pytest.mark.parametrize("name", list(FROZEN))
def test_frozen_parts_are_in_eval_mode_in_training(name, train_bn):
    make, frozen_path = FROZEN[name]
    strategy = make(train_bn)
    model = strategy.build(dropout_mlp(), dropout_mlp())
    module = TransferModule(model, strategy, torch.optim.SGD, lr=0.1, num_classes=3)
    module.train()
    frozen = model.get_submodule(frozen_path)
    dropouts = [m for m in frozen.modules() if isinstance(m, nn.Dropout)]
    norms = [m for m in frozen.modules() if isinstance(m, nn.BatchNorm1d)]
    assert dropouts and norms
    assert not any(m.training for m in dropouts)  # no masks on a fixed feature extractor
    assert all(m.training == train_bn for m in norms)  # statistics move only if asked
    assert model.head.training  # what trains is in training mode


@pytest.mark.parametrize("name", list(FROZEN))
def test_a_frozen_feature_extractor_is_deterministic_in_training(name):
    make, frozen_path = FROZEN[name]
    strategy = make(False)
    model = strategy.build(dropout_mlp(batch_norm=False), dropout_mlp(batch_norm=False))
    TransferModule(model, strategy, torch.optim.SGD, lr=0.1, num_classes=3).train()
    part = model.get_submodule(frozen_path)
    x = torch.randn(8, 1, 8, 8)
    if frozen_path != "backbone":  # a block past the backbone's Flatten
        x = x.flatten(1)
    assert torch.equal(part(x), part(x))
