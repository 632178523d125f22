"""The comparison protocol's pieces: LR schedules, selection on validation, the convergence check.

Local helpers (``Walker``, ``_trainer``, ``_fit_transfer``) live here, not in conftest.py.
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
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONF
from transfer_lab.convergence import ConvergenceCheck, judge
from transfer_lab.errors import ConfigError
from transfer_lab.schedulers import configure_scheduler, constant, cosine, onecycle
from transfer_lab.selection import Selection, default_monitor

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


class Walker(L.LightningModule):
    """One parameter ``w`` that SGD(lr=1) moves by +1 per step (loss = −w); the validation metric
    ``val/acc = −(w − peak)²`` peaks at step ``peak``; tests log ``test/w``. Records its LRs."""

    def __init__(self, peak: float = 5.0, schedule=None) -> None:
        super().__init__()
        self.w, self.peak, self.schedule, self.lrs = nn.Parameter(torch.zeros(())), peak, schedule, []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return -self.w

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", -(self.w.detach() - self.peak) ** 2)

    def test_step(self, batch, batch_idx):
        self.log("test/w", self.w.detach())

    def configure_optimizers(self):
        return configure_scheduler(self.schedule, torch.optim.SGD([self.w], lr=1.0), self.trainer)


def _loader(n: int = 10) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def _trainer(tmp_path, callbacks=(), **kw) -> L.Trainer:
    kw = {"max_steps": 10, "val_check_interval": 1, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), callbacks=list(callbacks), **kw)


@pytest.mark.parametrize("length", [{"max_steps": 20}, {"max_steps": -1, "max_epochs": 2}])
def test_cosine_in_a_real_trainer_spans_steps_or_epochs(tmp_path, length):
    """Total steps come from the trainer: 20 as max_steps, or 2 epochs × 10 batches."""
    module = Walker(schedule=partial(cosine, warmup_fraction=0.2))
    _trainer(tmp_path, limit_val_batches=0, **length).fit(module, _loader(), _loader(1))
    assert module.lrs[0] == pytest.approx(0.25) and module.lrs[3] == pytest.approx(1.0)  # 4 warm-up steps
    assert module.lrs[4 + 8] == pytest.approx(0.5) and len(module.lrs) == 20


@pytest.mark.parametrize("name", ["constant", "cosine", "onecycle"])
def test_every_scheduler_yaml_instantiates_to_a_factory(name):
    factory = instantiate(OmegaConf.load(CONF / "scheduler" / f"{name}.yaml"))
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=LR)
    out = configure_scheduler(factory, opt, type("T", (), {"estimated_stepping_batches": 10})())
    assert out["lr_scheduler"]["interval"] == "step"


def _select(tmp_path, select: str, early_stopping=None, max_steps: int = 10):
    sel = Selection(select, "classification", tmp_path / "ckpt", early_stopping)
    module, trainer = Walker(peak=5.0), _trainer(tmp_path, sel.callbacks(), max_steps=max_steps)
    trainer.fit(module, _loader(), _loader(1))
    path, record = sel.chosen(trainer)
    tested = trainer.test(module, _loader(1), ckpt_path=path, verbose=False)[0]
    return record, tested, trainer


def test_best_val_tests_the_peak_checkpoint_and_records_its_step(tmp_path):
    record, tested, _ = _select(tmp_path, "best_val")
    assert record == {"select": "best_val", "monitor": "val/acc", "mode": "max", "step": 5, "value": 0.0}
    assert tested["test/w"] == pytest.approx(5.0)  # the peak's weights, not the last (10)


def test_last_tests_the_final_weights(tmp_path):
    record, tested, _ = _select(tmp_path, "last")
    assert record["step"] == 10 and record["value"] == pytest.approx(-25.0)
    assert tested["test/w"] == pytest.approx(10.0)


def test_early_stopping_ends_after_patience_validations(tmp_path):
    record, tested, trainer = _select(tmp_path, "best_val", {"patience": 2, "min_delta": 0.0}, max_steps=50)
    assert trainer.global_step == 7  # best at 5, two worse validations (6, 7), stop
    assert record["step"] == 5 and tested["test/w"] == pytest.approx(5.0)


def test_selection_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="target.select='best'"):
        Selection("best", "classification", tmp_path)
    with pytest.raises(ConfigError, match="never a test one"):
        Selection("best_val", "classification", tmp_path, monitor="test/acc")
    with pytest.raises(ConfigError, match="target.early_stopping.patiense"):
        Selection("last", "classification", tmp_path, {"patiense": 3})
    assert default_monitor("regression") == ("val/loss", "min")
    assert Selection("best_val", "regression", tmp_path).checkpoint.mode == "min"


STEPS = (20, 40, 60, 80, 90, 100)
KW = {"monitor": "val/acc", "mode": "max", "val_tol": 0.01, "loss_tol": 0.05, "min_evals": 3}


def _history(vals, losses):
    return list(zip(STEPS, vals, losses))


def test_judge_a_plateau_is_converged():
    out = judge(_history([0.5, 0.8, 0.9, 0.9, 0.9, 0.9], [1.0, 0.4, 0.31, 0.30, 0.30, 0.30]), 100, **KW)
    assert out["converged"] is True and out["val_metric_change_last_fifth"] == 0
    # a memorised training set: the loss still halves (−33%), a negligible share of its whole fall
    out = judge(_history([0.5, 0.8, 0.9, 0.9, 0.9, 0.9], [1.2, 0.05, 0.004, 0.003, 0.0025, 0.002]), 100, **KW)
    assert out["converged"] is True and out["train_loss_change_last_fifth"] == pytest.approx(-1 / 3)


def test_judge_curves_still_moving_are_not_converged():
    rising = judge(_history([s / 100 for s in STEPS], [1 / s for s in STEPS]), 100, **KW)
    assert rising["converged"] is False and rising["val_metric_change_last_fifth"] == pytest.approx(0.2)
    assert rising["train_loss_change_last_fifth"] == pytest.approx(-0.2)
    # a too-low learning rate: the loss falls in a straight line, 1.5% in the last fifth
    slow = judge(_history([0.25] * 6, [1.38, 1.36, 1.34, 1.32, 1.31, 1.30]), 100, **KW)
    assert slow["converged"] is False and slow["train_loss_share_last_fifth"] == pytest.approx(0.25)
    assert "still falling" in slow["reason"]
    stuck = judge(_history([0.25] * 6, [1.39, 1.40, 1.38, 1.39, 1.385, 1.39]), 100, **KW)
    assert stuck["converged"] is False and "barely fell" in stuck["reason"]
    # min mode: a falling validation loss is an improvement
    val_loss = judge(_history([1 - s / 100 for s in STEPS], [1.0, 0.4, 0.31, 0.30, 0.30, 0.30]), 100,
                     **{**KW, "monitor": "val/loss", "mode": "min"})
    assert val_loss["converged"] is False and "val/loss still improving" in val_loss["reason"]


def test_judge_needs_a_curve():
    plateau = _history([0.5, 0.8, 0.9, 0.9, 0.9, 0.9], [1.0, 0.4, 0.31, 0.30, 0.30, 0.30])
    assert "too few" in judge(plateau[:2], 100, **KW)["reason"]
    one_in_last_fifth = [h for h in plateau if h[0] != 90]  # 80 → 100: one validation after the start
    assert "too few" in judge(one_in_last_fifth, 100, **KW)["reason"]


@pytest.fixture
def one_thread():
    """The machine's cores are shared: torch's default thread pool makes these runs 20× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _fit_transfer(tmp_path, steps: int, every: int = 10, lr: float = 1e-2) -> dict:
    """A real TransferModule (scratch, MLP) on synthetic data for ``steps`` optimizer steps,
    validated every ``every`` steps (at the end when the run is shorter)."""
    from transfer_lab.data import SyntheticData
    from transfer_lab.models import mlp
    from transfer_lab.module import TransferModule
    from transfer_lab.strategies.scratch import Scratch

    L.seed_everything(0, verbose=False)
    dm = SyntheticData(num_classes=4, shape=(1, 8, 8), n_train=100, n_test=20, noise=0.5, batch_size=16,
                       key="target.data")
    dm.prepare()
    model = mlp(in_channels=1, image_size=8, num_classes=4, hidden=[32])
    module = TransferModule(model, Scratch(), partial(torch.optim.Adam, lr=lr), lr=lr, num_classes=4)
    check = ConvergenceCheck(*default_monitor("classification"))
    _trainer(tmp_path, [check], max_steps=steps, val_check_interval=min(every, steps),
             check_val_every_n_epoch=None).fit(module, datamodule=dm)
    return check.result


@pytest.mark.parametrize("every", [1, 10])
def test_three_steps_is_not_converged(tmp_path, one_thread, every):
    """Validated after each step or once: three steps leave no last fifth to judge."""
    result = _fit_transfer(tmp_path, steps=3, every=every)
    assert result["converged"] is False and result["steps"] == 3 and "too few" in result["reason"]


@pytest.mark.parametrize(("lr", "why"), [(1e-4, "still falling"), (1e-5, "barely fell")])
def test_a_too_low_learning_rate_is_not_converged(tmp_path, one_thread, lr, why):
    """120 steps at a too-low rate: the loss changes by < 3% in the last fifth — flat to a tolerance
    on its value — but falls in a straight line (1e-4) or hardly at all (1e-5)."""
    result = _fit_transfer(tmp_path, steps=120, lr=lr)
    assert result["converged"] is False and why in result["reason"]
    assert abs(result["train_loss_change_last_fifth"]) < 0.03


def test_training_to_a_plateau_is_converged(tmp_path, one_thread):
    result = _fit_transfer(tmp_path, steps=120)
    assert result["converged"] is True, result
    assert result["n_evals"] == 12 and result["val_metric_change_last_fifth"] < 0.01


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
    trainer = _trainer(tmp_path, strategy.callbacks(), max_steps=-1, max_epochs=4, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    groups, sched = trainer.optimizers[0].param_groups, trainer.lr_scheduler_configs[0].scheduler
    assert len(groups) == 3  # head + two unfrozen blocks
    m = sched.multiplier(sched.last_epoch)
    assert m == pytest.approx(0.1)  # the end of the cosine
    assert [g["lr"] for g in groups] == pytest.approx([g["initial_lr"] * m for g in groups])
    assert groups[1]["initial_lr"] == pytest.approx(1e-3)  # added at lr_ratio × lr
