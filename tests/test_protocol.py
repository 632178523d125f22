"""The comparison protocol's LR schedules, alone, in a real trainer and wired around
TransferModule (selection on validation: test_selection.py; the convergence check: test_convergence.py).

Local helpers (``Walker``, ``tiny_trainer``, ``tiny_loader``) live in tests/protocol_helpers.py,
not in conftest.py.
"""

from __future__ import annotations

import math
from functools import partial

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from conftest import CONF
from protocol_helpers import Walker, tiny_loader, tiny_trainer
from transfer_lab.errors import ConfigError
from transfer_lab.schedulers import configure_scheduler, constant, cosine, onecycle

LR = 0.1


def _curve(factory, total: int, steps: int | None = None) -> list[float]:
    """The learning rate each optimizer step uses under ``factory``."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    sched = factory(opt, total)["scheduler"]
    lrs = []
    for _ in range(steps or total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_cosine_warmup_endpoints_midpoint_and_end():
    lrs = _curve(partial(cosine, warmup_fraction=0.1), 100)  # 10 warm-up steps, 90 of decay
    assert lrs[0] == pytest.approx(LR / 10)
    assert lrs[9] == pytest.approx(LR) and lrs[10] == pytest.approx(LR)
    assert lrs[5] == pytest.approx(LR * 6 / 10)  # linear
    assert lrs[10 + 45] == pytest.approx(LR / 2)  # half-way through the decay
    assert lrs[-1] < LR * 0.001 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))


def test_cosine_min_lr_ratio_and_no_warmup():
    lrs = _curve(partial(cosine, warmup_fraction=0.0, min_lr_ratio=0.1), 50, steps=60)
    assert lrs[0] == pytest.approx(LR)
    assert lrs[-1] == pytest.approx(LR * 0.1)  # past the estimate: stays at the floor


def test_onecycle_matches_torch_and_peaks_at_pct_start():
    total = 100
    lrs = _curve(partial(onecycle, pct_start=0.3), total)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    ref = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=total, pct_start=0.3,
                                              cycle_momentum=False)
    want = []
    for _ in range(total):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert lrs == pytest.approx(want, rel=1e-9)
    assert max(lrs) == pytest.approx(LR) and lrs.index(max(lrs)) == 29
    assert lrs[0] == pytest.approx(LR / 25) and lrs[-1] == pytest.approx(LR / 25 / 1e4, rel=1e-3)


def test_constant_and_groups_added_mid_run_are_scheduled(tmp_path):
    assert _curve(constant, 10) == [LR] * 10
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    sched = cosine(opt, 20, warmup_fraction=0.0)["scheduler"]
    for _ in range(10):
        opt.step()
        sched.step()
    # as BaseFinetuning.unfreeze_and_add_param_group does (gradual_unfreeze): torch's own
    # schedulers raise here (zip strict)
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "lr": 0.01})
    opt.step()
    sched.step()
    ratio = opt.param_groups[0]["lr"] / LR
    assert ratio < 0.5 and opt.param_groups[1]["lr"] == pytest.approx(0.01 * ratio)
    # a resumable checkpoint stays loadable with weights_only=True (run.last_checkpoint reads it so)
    torch.save(sched.state_dict(), tmp_path / "sched.pt")
    state = torch.load(tmp_path / "sched.pt", weights_only=True)
    assert state["last_epoch"] == 11 and len(state["base_lrs"]) == 2


def test_schedule_argument_errors():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    with pytest.raises(ConfigError, match="warmup_fraction"):
        cosine(opt, 10, warmup_fraction=1.5)
    with pytest.raises(ConfigError, match="pct_start"):
        onecycle(opt, 10, pct_start=0)

    class Endless:
        estimated_stepping_batches = math.inf

    with pytest.raises(ConfigError, match="finite length"):
        configure_scheduler(constant, opt, Endless())
    assert configure_scheduler(None, opt, Endless()) == {"optimizer": opt}


@pytest.mark.parametrize("length", [{"max_steps": 20}, {"max_steps": -1, "max_epochs": 2}])
def test_cosine_in_a_real_trainer_spans_steps_or_epochs(tmp_path, length):
    """Total steps come from the trainer: 20 as max_steps, or 2 epochs × 10 batches."""
    module = Walker(schedule=partial(cosine, warmup_fraction=0.2))
    tiny_trainer(tmp_path, limit_val_batches=0, **length).fit(module, tiny_loader(), tiny_loader(1))
    assert module.lrs[0] == pytest.approx(0.25) and module.lrs[3] == pytest.approx(1.0)  # 4 warm-up steps
    assert module.lrs[4 + 8] == pytest.approx(0.5) and len(module.lrs) == 20


@pytest.mark.parametrize("name", ["constant", "cosine", "onecycle"])
def test_every_scheduler_yaml_instantiates_to_a_factory(name):
    factory = instantiate(OmegaConf.load(CONF / "scheduler" / f"{name}.yaml"))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    out = configure_scheduler(factory, opt, type("T", (), {"estimated_stepping_batches": 10})())
    assert out["lr_scheduler"]["interval"] == "step"


def test_a_schedule_follows_the_groups_gradual_unfreeze_adds(tmp_path, one_thread):
    """TransferModule wired as the run will wire it (configure_scheduler around its optimizer):
    BaseFinetuning adds param groups mid-run; each joins the cosine schedule."""
    from transfer_lab.data import SyntheticData
    from transfer_lab.models import mlp
    from transfer_lab.module import TransferModule
    from transfer_lab.strategies.gradual_unfreeze import GradualUnfreeze

    class Wired(TransferModule):
        def configure_optimizers(self):
            return configure_scheduler(partial(cosine, warmup_fraction=0.0, min_lr_ratio=0.1),
                                       super().configure_optimizers(), self.trainer)

    L.seed_everything(0, verbose=False)
    dm = SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=20, n_test=8, batch_size=16, key="target.data")
    dm.prepare()
    strategy = GradualUnfreeze(start=1, every=1)
    net = partial(mlp, in_channels=1, image_size=8, num_classes=4, hidden=[16, 16])
    module = Wired(strategy.build(net(), net()), strategy, partial(torch.optim.Adam, lr=1e-2), lr=1e-2,
                   num_classes=4)
    trainer = tiny_trainer(tmp_path, strategy.callbacks(), max_steps=-1, max_epochs=4, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    groups, sched = trainer.optimizers[0].param_groups, trainer.lr_scheduler_configs[0].scheduler
    assert len(groups) == 3  # head + two unfrozen blocks
    m = sched.multiplier(sched.last_epoch)
    assert m == pytest.approx(0.1)  # the end of the cosine
    assert [g["lr"] for g in groups] == pytest.approx([g["initial_lr"] * m for g in groups])
    assert groups[1]["initial_lr"] == pytest.approx(1e-3)  # added at lr_ratio × lr
