"""The vectorised engine's two ways of running K seeds in one step (``vectorize_mode``): ``vmap``
and a per-seed ``loop`` on views of the stacked tensors. Both must equal K separate runs.

The helpers (``cell``, ``vectorised``, ``assert_same``) are test_vectorized.py's: the reference is
the real path (``TransferModule`` on a Trainer), one seed at a time.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

import test_vectorized
from test_vectorized import OPT, SEEDS, assert_same, cell, tiny_model, trainer, vectorised
from transfer_lab.errors import ConfigError
from transfer_lab.vectorized import VectorizedModule, engine, fit_seeds
from transfer_lab.vectorized.modes import resolve_mode

# the brief's list: plain, pretrained init, a penalty with per-seed references, adapters, a teacher
STRATEGIES = ["scratch", "finetune", "l2sp", "lora", "distill"]


@pytest.fixture
def built(monkeypatch):
    """Every VectorizedModule fit_seeds builds, with ``mode`` forced; the list of those built."""
    made = []

    def force(mode):
        def make(*args, **kw):
            made.append(VectorizedModule(*args, **{**kw, "mode": mode}))
            return made[-1]
        monkeypatch.setattr(engine, "VectorizedModule", make)
        return made
    return force


def test_auto_loops_over_seeds_for_convolutions_on_a_cpu_and_vmaps_otherwise():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object: no GPU needed
    assert resolve_mode("auto", tiny_model("cnn"), cpu) == "loop"
    assert resolve_mode("auto", tiny_model("mlp"), cpu) == "vmap"
    assert resolve_mode("auto", tiny_model("cnn"), cuda) == "vmap"
    assert resolve_mode("vmap", tiny_model("cnn"), cpu) == "vmap"
    assert resolve_mode("loop", tiny_model("mlp"), cuda) == "loop"
    assert resolve_mode("auto", tiny_model("mlp"), cuda, k=1) == "loop"  # one seed: nothing to batch
    assert resolve_mode("vmap", tiny_model("mlp"), cuda, k=1) == "vmap"
    with pytest.raises(ConfigError, match="vectorize_mode='grouped'"):
        resolve_mode("grouped", tiny_model("cnn"), cpu)


@pytest.mark.parametrize("mode", ["loop", "vmap"])
def test_a_fit_runs_the_mode_it_was_given(built, mode):
    made = built(mode)
    strategies, models, dms = zip(*(cell("finetune", s) for s in SEEDS))
    fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01, trainer(max_steps=1), test=False)
    assert made[0]._run == mode and made[0].seed_loss.per_seed is (mode == "loop")


def test_loop_and_vmap_train_the_same_weights(built):
    # a BatchNorm convnet, 2 epochs: only float reassociation may differ between the two modes
    weights, metrics = {}, {}
    for mode in ("loop", "vmap"):
        built(mode)
        strategies, models, dms = zip(*(cell("finetune", s) for s in SEEDS))
        res = fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01,
                        trainer(max_epochs=2, limit_val_batches=0), test=False)
        weights[mode] = [m.state_dict() for m in models]
        metrics[mode] = [r.metrics for r in res]
    for loop, vmapped in zip(weights["loop"], weights["vmap"]):
        for k, v in loop.items():
            assert torch.allclose(v.double(), vmapped[k].double(), atol=1e-5), k
    for loop, vmapped in zip(metrics["loop"], metrics["vmap"]):  # each seed's own figures
        assert loop.keys() == vmapped.keys() and "train/loss" in loop
        assert all(loop[k] == pytest.approx(vmapped[k], abs=1e-5) for k in loop)
    assert metrics["loop"][0]["train/loss"] != metrics["loop"][1]["train/loss"]
    # and training moved them (a mode that skipped the update would pass the comparison above)
    assert not torch.equal(weights["loop"][0]["head.weight"], cell("finetune", 0)[1].state_dict()["head.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["loop", "vmap"])
@pytest.mark.parametrize("name", STRATEGIES)
def test_each_mode_equals_k_separate_runs(built, name, mode):
    made = built(mode)
    assert_same(name, vectorised(name))
    assert made[0]._run == mode


@pytest.mark.slow
def test_class_weighted_loss_under_vmap_equals_separate_runs(built, monkeypatch):
    # vmap mode writes the weighted cross-entropy out (log_softmax, gather): held to F.cross_entropy
    monkeypatch.setitem(test_vectorized.DATA, "imbalance_ratio", 3.0)
    monkeypatch.setitem(test_vectorized.DATA, "imbalance_remedy", "reweight")
    assert cell("finetune", 0)[2].class_weights is not None
    built("vmap")
    assert_same("finetune", vectorised("finetune"))


class Recorder(Logger):
    """A logger that keeps what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict]] = []

    name, version = "recorder", 0

    @property
    def experiment(self):
        return None

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))


def test_each_seed_s_training_figures_reach_the_loggers_once_an_epoch():
    strategies, models, dms = zip(*(cell("l2sp", s) for s in SEEDS))
    log = Recorder()
    results = fit_seeds(list(models), list(strategies), list(dms), OPT, 0.01,
                        trainer(max_epochs=2, logger=log, limit_val_batches=0), test=False)
    train = [(step, m) for step, m in log.rows if "seed0/train/loss" in m]
    assert [m["epoch"] for _, m in train] == [0, 1]
    last = train[-1][1]
    for k, res in enumerate(results):  # the logged figures are each seed's own, as returned
        for key in ("train/loss", "train/acc", "train/task", "train/l2sp"):
            assert last[f"seed{k}/{key}"] == pytest.approx(res.metrics[key])
    assert last["seed0/train/loss"] != last["seed1/train/loss"]


def test_a_bad_vectorize_mode_is_refused_before_anything_runs():
    from conftest import compose_cfg

    assert compose_cfg("vectorize_mode=loop").vectorize_mode.value == "loop"
    with pytest.raises(Exception, match="vectorize_mode"):
        compose_cfg("vectorize_mode=bogus")
