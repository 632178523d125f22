"""The vectorised engine's two ways of running K seeds in one step (``vectorize_mode``): ``vmap``
and a per-seed ``loop`` on views of the stacked tensors. Both must equal K separate runs.

The helpers (``cell``, ``vectorised``, ``assert_same``) are test_vectorized.py's: the reference is
the real path (``TransferModule`` on a Trainer), one seed at a time.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.loggers.logger import Logger

import test_vectorized
from test_vectorized import OPT, SEEDS, assert_same, cell, tiny_model, trainer, vectorised
from transfer_lab.errors import ConfigError
from transfer_lab.vectorized import VectorizedModule, engine, fit_seeds
from transfer_lab.vectorized import module as module_py
from transfer_lab.vectorized.modes import backward_per_seed, resolve_mode

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


# --- loop mode's per-seed backward (modes.loop_seeds with trainable names) ----------------------

def _loop_module(k: int = 3) -> tuple[VectorizedModule, tuple]:
    """A loop-mode module of ``k`` finetune seeds (BatchNorm convnet) and one K-stacked batch."""
    strategies, models, dms = zip(*(cell("finetune", s) for s in range(k)))
    module = VectorizedModule(list(models), list(strategies), OPT, 0.01, dms[0].num_classes, mode="loop")
    g = torch.Generator().manual_seed(0)
    return module, (torch.randn(k, 16, 1, 8, 8, generator=g), torch.randint(0, 4, (k, 16), generator=g))


def _peak_saved_tensors(module: VectorizedModule, batch: tuple) -> int:
    """The most tensors autograd held for backward at once during one training step + backward."""
    live, peak = [0], [0]

    class Saved:
        def __init__(self, t: torch.Tensor) -> None:
            self.t = t
            live[0] += 1
            peak[0] = max(peak[0], live[0])

        def __del__(self) -> None:
            live[0] -= 1

    with torch.autograd.graph.saved_tensors_hooks(Saved, lambda s: s.t):
        module.training_step(batch, 0).backward()
    return peak[0]


def test_loop_mode_holds_one_seed_s_activations_at_a_time(monkeypatch):
    # each seed's backward runs before the next seed's forward: K seeds hold what one seed holds
    one = _peak_saved_tensors(*_loop_module(1))
    assert one > 0
    assert _peak_saved_tensors(*_loop_module(3)) == one
    # one backward over the K graphs (what a loss scaler gets) holds all K seeds' at once
    monkeypatch.setattr(module_py, "backward_per_seed", lambda trainer, trainable: None)
    assert _peak_saved_tensors(*_loop_module(3)) >= 3 * one


def test_per_seed_backward_gives_the_one_backward_s_gradients(monkeypatch):
    grads = {}
    for path in ("per_seed", "one_backward"):
        if path == "one_backward":
            monkeypatch.setattr(module_py, "backward_per_seed", lambda trainer, trainable: None)
        module, batch = _loop_module(3)
        loss = module.training_step(batch, 0)
        (loss / 2).backward()  # as Lightning's accumulate_grad_batches=2 scales it
        grads[path] = {n: p.grad for n, p in module.stacked.named_parameters()}
        assert loss.item() == pytest.approx(module.train_loss_sum().sum().item() / 16)
    assert grads["per_seed"].keys() == grads["one_backward"].keys()
    for n, g in grads["per_seed"].items():
        assert g is not None and g.abs().sum() > 0, n
        assert torch.allclose(g, grads["one_backward"][n], atol=1e-7), n


def test_a_loss_scaler_or_no_grad_turns_the_per_seed_backward_off():
    plain, scaled = SimpleNamespace(precision_plugin=SimpleNamespace(scaler=None)), \
        SimpleNamespace(precision_plugin=SimpleNamespace(scaler=object()))
    assert backward_per_seed(plain, ["w"]) == ["w"] and backward_per_seed(None, ["w"]) == ["w"]
    assert backward_per_seed(scaled, ["w"]) is None  # 16-mixed: each seed's backward must be scaled
    assert backward_per_seed(plain, []) is None
    with torch.no_grad():
        assert backward_per_seed(plain, ["w"]) is None


@pytest.mark.slow
def test_loop_mode_with_gradient_accumulation_and_clipping_equals_separate_runs(built):
    # the per-seed gradients reach the stacked parameters through Lightning's own backward:
    # scaled by 1/accumulate_grad_batches, then clipped per seed, as each separate run's
    made = built("loop")
    kw = {"accumulate_grad_batches": 2, "gradient_clip_val": 0.05}
    assert_same("l2sp", vectorised("l2sp", trainer_kw=kw), trainer_kw=kw)
    assert made[0]._run == "loop"
