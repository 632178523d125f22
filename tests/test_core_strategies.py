"""Contracts of the first four strategies, plus one end-to-end run per strategy YAML (by glob)."""

import json

import pytest
import torch
from hydra.utils import instantiate

from conftest import STRATEGIES, compose_cfg
from transfer_lab.errors import ConfigError
from transfer_lab.models import convnet
from transfer_lab.module import TransferModule
from transfer_lab.run import run
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.finetune import Finetune
from transfer_lab.strategies.linear_probe import LinearProbe
from transfer_lab.strategies.partial import Partial
from transfer_lab.strategies.scratch import Scratch


def pair(num_classes=3):
    torch.manual_seed(0)
    src = convnet(1, 12, 4, channels=[4, 8])
    src.backbone[0][1].running_mean.add_(0.5)  # make BN buffers distinguishable from a fresh init
    torch.manual_seed(1)
    return src, convnet(1, 12, num_classes, channels=[4, 8])


def train_steps(model, strategy, steps=3):
    module = TransferModule(model, strategy, lambda g: torch.optim.SGD(g, lr=0.1), lr=0.1, num_classes=3)
    module.train()
    opt = module.configure_optimizers()
    for _ in range(steps):
        x, y = torch.randn(8, 1, 12, 12), torch.randint(0, 3, (8,))
        opt.zero_grad()
        module.training_step((x, y), 0).backward()
        opt.step()
    return module


def test_finetune_starts_with_every_backbone_weight_of_the_source():
    src, tgt = pair()
    model = Finetune().build(src, tgt)
    for (k, a), b in zip(src.backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(a, b), k
    assert model.head.out_features == 3 and all(p.requires_grad for p in model.parameters())


def test_linear_probe_keeps_backbone_weights_and_bn_buffers_identical_after_training():
    src, tgt = pair()
    model = LinearProbe().build(src, tgt)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    head_before = model.head.weight.clone()
    train_steps(model, LinearProbe())
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert not torch.equal(model.head.weight, head_before)


def test_partial_copies_chosen_blocks_only_and_freezes_them():
    src, tgt = pair()
    fresh = {k: v.clone() for k, v in tgt.state_dict().items()}
    model = Partial(blocks=1).build(src, tgt)
    for k, v in model.state_dict().items():
        if k.startswith("backbone.conv1."):
            assert torch.equal(v, src.state_dict()[k]), k
        elif k.endswith("weight") and v.dim() > 1:
            assert torch.equal(v, fresh[k]) and not torch.equal(v, src.state_dict().get(k, v + 1)), k
    assert not any(p.requires_grad for p in model.backbone.conv1.parameters())
    assert all(p.requires_grad for p in model.backbone.conv2.parameters())


def test_partial_by_glob_and_its_errors():
    src, tgt = pair()
    model = Partial(blocks=None, layers=["backbone.conv2.0"], freeze_transferred=False).build(src, tgt)
    assert torch.equal(model.backbone.conv2[0].weight, src.backbone.conv2[0].weight)
    assert not torch.equal(model.backbone.conv1[0].weight, src.backbone.conv1[0].weight)
    with pytest.raises(ConfigError, match="'backbone.nope\\*' matches no module"):
        Partial(blocks=None, layers=["backbone.nope*"]).build(*pair())
    with pytest.raises(ConfigError, match="strategy.blocks=9"):
        Partial(blocks=9).build(*pair())


def test_copy_between_different_architectures_names_the_tensor():
    src = convnet(1, 12, 4, channels=[4, 8])
    tgt = convnet(1, 12, 4, channels=[6, 8])
    with pytest.raises(ConfigError, match="backbone.conv1.0.weight differs"):
        Finetune().build(src, tgt)


def test_scratch_needs_no_source():
    _, tgt = pair()
    assert Scratch.needs_source is False and Scratch().build(None, tgt) is tgt


@pytest.mark.slow
@pytest.mark.parametrize("name", STRATEGIES)
def test_every_strategy_yaml_runs_end_to_end(name, tmp_path):
    """Discovered by glob: a new strategy YAML is tested here without editing this file."""
    cfg = compose_cfg(f"strategy={name}", store=tmp_path / "store")
    assert isinstance(instantiate(cfg.strategy), Strategy)
    res = run(cfg, tmp_path / "out", {"strategy": name})
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["status"] == "ok" and saved["strategy"] == name
    assert 0.0 <= saved["metrics"]["test/acc"] <= 1.0
    assert 0 < saved["params"]["trainable"] <= saved["params"]["total"]
    assert res["metrics"] == saved["metrics"]
    # the module logs the loss and each named term of the strategy's loss; they add up
    metrics = saved["metrics"]
    terms = [v for k, v in metrics.items()
             if k.startswith("train/") and k not in ("train/loss", "train/acc", "train/mse")]
    assert terms and metrics["train/loss"] == pytest.approx(sum(terms), rel=1e-4, abs=1e-6)
