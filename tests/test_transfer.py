"""Forward-hook capture, layer matching / adaptation and Net2Net function preservation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.hooks import FeatureCapture, capture_features
from transfer_lab.models import convnet, lenet, mlp, resnet_cifar
from transfer_lab.strategies.weight_transfer import WeightTransfer
from transfer_lab.transfer import (check_function, format_report, match_layers, net2deeper, net2wider,
                                  transfer_weights)


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so preservation is really tested."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model


# --- hooks ----------------------------------------------------------------------------------
def test_hooks_return_the_named_layers_and_are_removed():
    torch.manual_seed(0)
    model = convnet(1, 16, 3, channels=(4, 8)).eval()
    x = torch.randn(2, 1, 16, 16)
    with FeatureCapture(model, ["backbone.conv1", "backbone.pool", "head"]) as cap:
        logits = model(x)
    b = model.backbone
    assert torch.equal(cap["backbone.conv1"], b.conv1(x))
    assert torch.equal(cap["backbone.pool"], b.pool(b.conv2(b.conv1(x))))
    assert torch.equal(cap["head"], logits)
    assert all(not m._forward_hooks for m in model.modules())  # removed on exit
    feats = capture_features(model, x, ["backbone.conv2.0"])
    assert feats["backbone.conv2.0"].shape == (2, 8, 8, 8) and not feats["backbone.conv2.0"].requires_grad


def test_hooks_fail_naming_a_missing_path():
    with pytest.raises(ConfigError, match="backbone.conv9"):
        FeatureCapture(convnet(1, 16, 3, channels=(4, 8)), ["backbone.conv9"])


def test_capture_of_a_leaf_before_an_inplace_relu_keeps_its_own_output():
    """mlp's fc1 is Linear → ReLU(inplace): the capture of the Linear must stay pre-ReLU."""
    torch.manual_seed(0)
    model = mlp(1, 8, 3, hidden=[16]).eval()
    x = torch.randn(4, 1, 8, 8)
    pre = model.backbone.fc1[0](x.flatten(1))
    assert (pre < 0).any()  # so the ReLU would change it
    torch.testing.assert_close(capture_features(model, x, ["backbone.fc1.0"])["backbone.fc1.0"], pre)
    with FeatureCapture(model, ["backbone.fc1.0"]) as cap:
        model(x)
    torch.testing.assert_close(cap["backbone.fc1.0"], pre)


# --- Net2Net ----------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_norm", [False, True])
def test_net2net_preserves_a_cnn(batch_norm):
    torch.manual_seed(0)
    src = _randomise_bn(convnet(3, 16, 5, channels=(4, 8, 8), batch_norm=batch_norm)).eval()
    x = torch.randn(6, 3, 16, 16)
    wide = net2wider(src, "backbone.conv1.0", 7)
    wide = net2wider(wide, "backbone.conv3.0", 13)  # the head widens its inputs
    deep = net2deeper(net2deeper(wide, "backbone.conv1"), "backbone.conv3").eval()
    assert wide.backbone.conv1[0].out_channels == 7 and wide.head.in_features == 13
    assert "conv1_deeper" in dict(deep.backbone.named_children())
    assert any(isinstance(m, nn.BatchNorm2d) for m in deep.backbone.conv1_deeper) == batch_norm
    ref = src(x)
    torch.testing.assert_close(wide.eval()(x), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(deep(x), ref, atol=1e-5, rtol=0)
    assert src.backbone.conv1[0].out_channels == 4  # the source is untouched


@pytest.mark.parametrize("batch_norm", [False, True])
def test_net2net_preserves_an_mlp(batch_norm):
    torch.manual_seed(0)
    src = _randomise_bn(mlp(1, 8, 4, hidden=(10, 12), batch_norm=batch_norm)).eval()
    x = torch.randn(5, 1, 8, 8)
    grown = net2deeper(net2wider(net2wider(src, "backbone.fc1.0", 25), "backbone.fc2.0", 30),
                       "backbone.fc2").eval()
    torch.testing.assert_close(grown(x), src(x), atol=1e-5, rtol=0)
    assert grown.feature_dim == 30


def test_net2wider_through_flatten_and_errors():
    torch.manual_seed(0)
    src = lenet(1, 28, 10).eval()  # conv2 (16 maps of 5x5) feeds fc1 through Flatten
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(net2wider(src, "backbone.conv2.0", 20).eval()(x), src(x),
                               atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="shrink"):
        net2wider(src, "backbone.conv2.0", 8)
    with pytest.raises(ConfigError, match="last layer"):
        net2wider(src, "head", 20)
    with pytest.raises(ConfigError, match="not a Linear/Conv2d"):
        net2wider(src, "backbone.nope", 20)


# --- matching and adaptation -----------------------------------------------------------------
def test_identical_architectures_copy_everything():
    torch.manual_seed(0)
    src, tgt = convnet(1, 16, 4, channels=(4, 8)), convnet(1, 16, 4, channels=(4, 8))
    rows = transfer_weights(src, tgt)
    assert {r["action"] for r in rows} == {"copied"} and len(rows) == 5
    for k, v in src.state_dict().items():
        assert torch.equal(v, tgt.state_dict()[k]), k


def test_different_architectures_report_each_layer():
    torch.manual_seed(0)
    src = convnet(1, 16, 4, channels=(4, 8), batch_norm=True)
    tgt = convnet(3, 16, 4, channels=(8, 8, 16), batch_norm=True)
    rows = {r["layer"]: r for r in transfer_weights(src, tgt, exclude=["head"])}
    expect = {"backbone.conv1.0": ("adapted", [8, 3, 3, 3], [4, 1, 3, 3]),
              "backbone.conv1.1": ("adapted", [8], [4]),
              "backbone.conv2.0": ("adapted", [8, 8, 3, 3], [8, 4, 3, 3]),
              "backbone.conv2.1": ("copied", [8], [8]),
              "backbone.conv3.0": ("reinitialised", [16, 8, 3, 3], None),
              "backbone.conv3.1": ("reinitialised", [16], None),
              "head": ("reinitialised", [4, 16], None)}
    assert set(rows) == set(expect)
    for name, (action, t_shape, s_shape) in expect.items():
        r = rows[name]
        assert r["action"] == action, name
        assert r["target_shape"]["weight"] == t_shape
        assert (r["source_shape"] or {}).get("weight") == s_shape
        assert r["source"] == (name if s_shape else None)
    assert rows["head"]["note"] == "excluded"
    assert format_report(list(rows.values())).endswith("1 copied, 3 adapted, 3 reinitialised")
    # grey → RGB first conv: a grey image repeated into RGB gets the source's response
    xg = torch.rand(2, 1, 16, 16)
    out_t = tgt.backbone.conv1[0](xg.repeat(1, 3, 1, 1))
    torch.testing.assert_close(out_t[:, :4], src.backbone.conv1[0](xg), atol=1e-5, rtol=0)


def test_matching_by_order_within_type_when_names_differ():
    torch.manual_seed(0)
    src = net2deeper(mlp(1, 8, 3, hidden=(6,)), "backbone.fc1")  # fc1, fc1_deeper
    tgt = mlp(1, 8, 3, hidden=(6, 6))  # fc1, fc2
    pairs = match_layers(src, tgt)
    assert pairs == {"backbone.fc1.0": "backbone.fc1.0", "backbone.fc2.0": "backbone.fc1_deeper.0",
                     "head": "head"}
    rows = transfer_weights(src, tgt)
    assert [r["action"] for r in rows] == ["copied"] * 3
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(tgt(x), src(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_tiling_with_rescaled_inputs_preserves_the_function(batch_norm):
    """Widening by shape adaptation alone (tile outputs, divide tiled inputs) is Net2Wider with
    the cyclic mapping: the wider target computes the source's function."""
    torch.manual_seed(0)
    src = _randomise_bn(convnet(1, 16, 4, channels=(4, 8), batch_norm=batch_norm)).eval()
    tgt = convnet(1, 16, 4, channels=(8, 20), batch_norm=batch_norm).eval()
    rows = transfer_weights(src, tgt)
    assert {r["action"] for r in rows} == {"adapted"}
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(tgt(x), src(x), atol=1e-5, rtol=0)


def test_kernel_size_is_centre_cropped_or_padded():
    torch.manual_seed(0)
    src, tgt = lenet(1, 28, 10), convnet(1, 28, 10, channels=(6, 16))  # 5x5 → 3x3 kernels
    rows = {r["layer"]: r for r in transfer_weights(src, tgt)}
    assert rows["backbone.conv1.0"]["action"] == "adapted"
    torch.testing.assert_close(tgt.backbone.conv1[0].weight, src.backbone.conv1[0].weight[:, :, 1:4, 1:4])
    rows = {r["layer"]: r for r in transfer_weights(tgt, lenet(1, 28, 10))}
    assert rows["backbone.conv1.0"]["action"] == "adapted"


# --- the grown source is checked before training -------------------------------------------------
@pytest.mark.parametrize("make, kwargs, key", [
    (lambda: lenet(1, 16, 4), {"deepen": ["backbone.conv2"]}, "strategy.deepen=[backbone.conv2]"),
    (lambda: resnet_cifar(3, 16, 4, depth=8, width=4), {"widen": [["backbone.stem.0", 8]]},
     "strategy.widen=[backbone.stem.0, 8]"),
])
def test_net2net_step_that_breaks_the_model_is_one_config_error(make, kwargs, key):
    torch.manual_seed(0)
    with pytest.raises(ConfigError) as e:
        WeightTransfer(**kwargs).build(make(), make())
    assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_check_function_rejects_a_changed_function_and_accepts_a_preserving_step():
    torch.manual_seed(0)
    src = _randomise_bn(convnet(1, 12, 3, channels=(4, 8)))
    check_function(src, net2wider(src, "backbone.conv1.0", 6), "widen")  # preserving: passes
    changed = net2wider(src, "backbone.conv1.0", 6, noise=0.5)
    with pytest.raises(ConfigError, match="no longer computes the source's function"):
        check_function(src, changed, "widen")
    check_function(src, changed, "widen", exact=False)  # with noise only running is required


def test_weight_transfer_with_a_breaking_deepen_fails_in_prepare_before_training(tmp_path):
    from conftest import compose_cfg
    from transfer_lab.run import prepare

    cfg = compose_cfg("strategy=weight_transfer", "model@source.model=lenet",
                      "model@target.model=lenet", "strategy.deepen=[backbone.conv2]",
                      store=tmp_path / "store")
    with pytest.raises(ConfigError, match=r"strategy.deepen=\[backbone.conv2\]: the grown source"):
        prepare(cfg)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").iterdir())
