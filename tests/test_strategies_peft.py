"""Behaviour of adapter and lora (parameter-efficient fine-tuning): what trains, the start from
the source, LoRA's merge, config errors, trainable-only checkpoints (also linear_probe's).

Local helpers (``ARCHS``, ``pair``, ``train_steps``) live in tests/finetuning_helpers.py.
"""

import copy

import pytest
import torch

from finetuning_helpers import ARCHS, pair, train_steps
from transfer_lab.checkpoint import load_trainable, save_trainable
from transfer_lab.errors import ConfigError
from transfer_lab.models import convnet
from transfer_lab.strategies.adapter import Adapter
from transfer_lab.strategies.linear_probe import LinearProbe
from transfer_lab.strategies.lora import LoRA
from transfer_lab.strategies.peft_layers import AdapterLayer, LoRALayer


@pytest.mark.parametrize("strategy_cls, prefix", [(Adapter, "adapter_"), (LoRA, "lora_")])
def test_prefixes_name_the_trainable_backbone_parameters(strategy_cls, prefix):
    src, tgt, _ = pair("resnet")
    model = strategy_cls().build(src, tgt)
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(n.split(".")[-2].startswith(prefix) or
                             n.split(".")[-1].startswith(prefix) for n in trainable)
    assert any(".base_layer." in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("strategy_cls", [Adapter, LoRA])
def test_adapters_and_lora_train_a_small_fraction_of_the_backbone(strategy_cls):
    torch.manual_seed(0)
    src, tgt = convnet(1, 28, 5), convnet(1, 28, 5)  # the experiment's model
    n_backbone = sum(p.numel() for p in src.backbone.parameters())
    model = strategy_cls().build(src, tgt)
    n_new = sum(p.numel() for p in model.backbone.parameters() if p.requires_grad)
    assert 0 < n_new < 0.12 * n_backbone, (n_new, n_backbone)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("strategy_cls", [Adapter, LoRA])
def test_adapter_and_lora_start_as_the_source(strategy_cls, arch):
    src, tgt, shape = pair(arch)
    model = strategy_cls().build(src, tgt)
    model.head.load_state_dict(src.head.state_dict()) if tgt.num_classes == src.num_classes else None
    wrapper = AdapterLayer if strategy_cls is Adapter else LoRALayer
    assert any(isinstance(m, wrapper) for m in model.modules())
    x = torch.randn(5, *shape)
    src.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.backbone(x), src.backbone(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_merge_gives_a_plain_model_with_the_same_outputs(arch):
    src, tgt, shape = pair(arch)
    strategy = LoRA(r=2, alpha=4.0)
    model = strategy.build(src, tgt)
    with torch.no_grad():  # as if trained: B away from zero
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    x = torch.randn(6, *shape)
    model.eval()
    with torch.no_grad():
        before = model(x)
        merged = LoRA.merge(model)
        after = merged(x)
    assert not any(isinstance(m, LoRALayer) for m in merged.modules())
    assert not any("lora_" in k or "base_layer" in k for k in merged.state_dict())
    plain = ARCHS[arch][0](3)
    plain.load_state_dict(merged.state_dict())  # strict: exactly the plain architecture's keys
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), before, rtol=0, atol=1e-5)


def test_lora_and_adapter_config_errors_name_the_key():
    src, tgt, _ = pair()
    with pytest.raises(ConfigError, match="backbone.conv1.1 is a BatchNorm2d"):
        LoRA(layers=["backbone.conv1.1"]).build(src, tgt)
    with pytest.raises(ConfigError, match="strategy.r=0"):
        LoRA(r=0)
    with pytest.raises(ConfigError, match="'backbone.nope' matches no module"):
        Adapter(layers=["backbone.nope"]).build(*pair()[:2])


@pytest.mark.parametrize("strategy_cls", [Adapter, LoRA, LinearProbe])
def test_trainable_only_checkpoint_loads_back_to_the_same_model(strategy_cls, tmp_path):
    src, tgt, shape = pair()
    model = strategy_cls().build(src, tgt)
    train_steps(model, strategy_cls(), shape, steps=3)
    path = save_trainable(model, tmp_path / "t.safetensors", "key123")
    torch.manual_seed(7)  # a different fresh head: only the file can make the models agree
    again = strategy_cls().build(copy.deepcopy(src), ARCHS["convnet"][0](3))
    x = torch.randn(5, *shape)
    model.eval(), again.eval()
    assert not torch.allclose(again(x), model(x))
    assert load_trainable(again, path) == "key123"
    torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert not any(".base_layer." in k for k in keys) and "backbone.conv1.0.weight" not in keys
