"""Property tests over weight transfer between randomly generated small MLP/CNN pairs:
``transfer_lab.transfer`` (matching, Net2Net) and the strategies' copy helpers never fail with
anything but a clear ``ConfigError``/``ValueError`` and always leave shapes consistent."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models import Classifier, convnet, lenet, mlp
from transfer_lab.strategies.common import copy_backbone
from transfer_lab.strategies.partial import Partial
from transfer_lab.transfer import net2deeper, net2wider, transfer_weights
from transfer_lab.transfer.matching import ACTIONS, param_layers

FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
CLEAR = (ConfigError, ValueError)


@st.composite
def models(draw, in_c=None, size=None, classes=None, kind=None):
    """A small random Classifier and the keyword arguments that rebuild it."""
    kind = kind or draw(st.sampled_from(["mlp", "convnet", "lenet"]))
    in_c = in_c or draw(st.sampled_from([1, 3]))
    size = size or draw(st.integers(10, 14))
    classes = classes or draw(st.integers(2, 5))
    if kind == "mlp":
        kw = dict(hidden=draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)),
                  batch_norm=draw(st.booleans()))
    elif kind == "convnet":
        kw = dict(channels=draw(st.lists(st.integers(1, 8), min_size=1, max_size=3)),
                  batch_norm=draw(st.booleans()))
    else:
        kw = {}
    build = {"mlp": mlp, "convnet": convnet, "lenet": lenet}[kind]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return build(in_c, size, classes, **kw).eval(), (kind, in_c, size, classes, kw)


def _shapes(m: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def _randomise_bn(m: nn.Module) -> None:
    """Non-trivial running statistics, so eval-mode BatchNorm is not the identity."""
    g = torch.Generator().manual_seed(0)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=g) * 0.1)
            mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)


@FUZZ
@given(pair=st.tuples(models(), models()), include_head=st.booleans())
def test_matching_transfer_between_random_pairs(pair, include_head):
    (src, _), (tgt, (_, in_c, size, classes, _)) = pair
    before = _shapes(tgt)
    try:
        rows = transfer_weights(src, tgt, exclude=() if include_head else ("head",))
    except CLEAR as e:
        assert "\n" not in str(e)
        event("clear error")
        return
    event("transferred")
    assert _shapes(tgt) == before, "transfer changed the target's shapes"
    assert [r["layer"] for r in rows] == [n for n, _ in param_layers(tgt)]
    assert {r["action"] for r in rows} <= set(ACTIONS)
    src_state, tgt_mods = src.state_dict(), dict(tgt.named_modules())
    for r in rows:
        if r["action"] == "copied":
            for k, v in tgt_mods[r["layer"]].state_dict().items():
                assert torch.equal(v, src_state[f"{r['source']}.{k}"])
    with torch.no_grad():
        out = tgt(torch.randn(2, in_c, size, size))
    assert out.shape == (2, classes) and torch.isfinite(out).all()


@FUZZ
@given(src=models(in_c=1, size=12, classes=3, kind="mlp"), extra=st.lists(st.integers(0, 6), max_size=3))
def test_widening_by_matching_preserves_the_function(src, extra):
    """Target = source with every hidden layer at least as wide: tiling + input rescaling makes
    the target compute the source's logits (eval mode)."""
    src, (_, _, _, _, kw) = src
    _randomise_bn(src)
    wider = [h + (extra[i] if i < len(extra) else 0) for i, h in enumerate(kw["hidden"])]
    tgt = mlp(1, 12, 3, hidden=wider, batch_norm=kw["batch_norm"]).eval()
    transfer_weights(src, tgt, exclude=())
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(tgt(x), src(x), atol=1e-4, rtol=1e-4)


@FUZZ
@given(src=models(in_c=3, size=12, classes=3, kind="convnet"), extra=st.lists(st.integers(0, 5), max_size=3))
def test_widening_convnets_by_matching_preserves_the_function(src, extra):
    src, (_, _, _, _, kw) = src
    _randomise_bn(src)
    wider = [c + (extra[i] if i < len(extra) else 0) for i, c in enumerate(kw["channels"])]
    tgt = convnet(3, 12, 3, channels=wider, batch_norm=kw["batch_norm"]).eval()
    transfer_weights(src, tgt, exclude=())
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(tgt(x), src(x), atol=1e-4, rtol=1e-4)


@FUZZ
@given(src=models(), data=st.data())
def test_net2net_growth_is_function_preserving_or_a_clear_error(src, data):
    src, (_, in_c, size, classes, _) = src
    _randomise_bn(src)
    layers = [n for n, m in src.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    blocks = [n for n, _ in src.named_blocks()] + ["head", "backbone.nope"]
    x = torch.randn(2, in_c, size, size)
    with torch.no_grad():
        ref = src(x)
        try:
            if data.draw(st.booleans(), label="widen"):
                grown = net2wider(src, data.draw(st.sampled_from(layers + ["nope"]), label="layer"),
                                  data.draw(st.integers(1, 16), label="width"))
            else:
                grown = net2deeper(src, data.draw(st.sampled_from(blocks), label="after"))
        except CLEAR as e:
            assert "\n" not in str(e)
            event("clear error")
            return
        event("grown")
        grown.eval()
        torch.testing.assert_close(grown(x), ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(src(x), ref)  # the input model is untouched


@FUZZ
@given(pair=st.tuples(models(), models()))
def test_strict_backbone_copy_is_all_or_a_clear_error(pair):
    """Finetune / linear_probe's copy: every tensor copied, or one ConfigError and nothing copied."""
    (src, _), (tgt, _) = pair
    before = {k: v.clone() for k, v in tgt.state_dict().items()}
    try:
        copy_backbone(src, tgt, "finetune")
    except ConfigError as e:
        assert "\n" not in str(e) and "strategy=finetune" in str(e)
        assert all(torch.equal(v, before[k]) for k, v in tgt.state_dict().items())
        event("clear error")
        return
    event("copied")
    for k, v in tgt.backbone.state_dict().items():
        assert torch.equal(v, src.backbone.state_dict()[k])
    assert all(torch.equal(v, before[f"head.{k}"]) for k, v in tgt.head.state_dict().items())


@FUZZ
@given(pair=st.tuples(models(), models()), blocks=st.integers(-1, 5),
       glob=st.none() | st.sampled_from(["backbone.*", "backbone.conv1*", "backbone.fc1", "head", "x*"]))
def test_partial_transfer_is_consistent_or_a_clear_error(pair, blocks, glob):
    (src, _), (tgt, _) = pair
    shapes = _shapes(tgt)
    try:
        strategy = Partial(blocks=None if glob else blocks, layers=[glob] if glob else None)
        model = strategy.build(src, tgt)
    except ConfigError as e:
        assert "\n" not in str(e)
        event("clear error")
        return
    event("transferred")
    assert isinstance(model, Classifier) and _shapes(model) == shapes
    for name in strategy.transferred:
        for k, v in model.get_submodule(name).state_dict().items():
            assert torch.equal(v, src.get_submodule(name).state_dict()[k])
        assert not any(p.requires_grad for p in model.get_submodule(name).parameters())


def test_partial_module_missing_in_source_is_a_config_error():
    with pytest.raises(ConfigError, match="backbone.flatten"):
        Partial(blocks=None, layers=["backbone.*"]).build(lenet(1, 12, 3), mlp(1, 12, 3, hidden=[4]))
