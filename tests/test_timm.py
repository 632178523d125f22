"""model=timm: any timm architecture as Classifier(backbone, head), local weights checked strictly,
the block structure the layer-wise strategies address, and the statistics the weights declare."""

import pytest
import torch
from safetensors.torch import save_file

from transfer_lab.errors import ConfigError
from transfer_lab.models import model_data_config, timm_model, timm_state_dict
from transfer_lab.strategies.adapter import Adapter
from transfer_lab.strategies.lora import LoRA
from transfer_lab.strategies.partial import Partial

timm = pytest.importorskip("timm")

# (name, blocks named by module path, LoRA globs) — kept tiny: 32×32, the smallest configs
CASES = [
    pytest.param(("resnet18", ["conv1", "bn1", "layer1", "layer2", "layer3", "layer4"], None)),
    pytest.param(("convnext_zepto_rms", ["stem", "stages_0", "stages_1", "stages_2", "stages_3",
                                         "pre_logits"], None)),
    pytest.param(("vit_tiny_patch16_224", ["patch_embed", "tokens", *[f"blocks_{i}" for i in range(12)],
                                           "norm"], ["backbone.blocks_*.attn.qkv"]),
                 marks=pytest.mark.slow),  # 12 blocks: ~30 s on 2 busy cores
]


def build(name, k=5, c=3, seed=0, **kw):
    torch.manual_seed(seed)
    return timm_model(c, 32, k, name=name, **kw)


@pytest.fixture(scope="module", params=CASES, ids=["resnet18", "convnext", "vit"])
def pair(request):
    name, blocks, lora_layers = request.param
    return name, blocks, lora_layers, build(name, seed=0), build(name, seed=1)


def test_builds_forward_and_blocks(pair):
    name, blocks, _, src, _ = pair
    x = torch.randn(2, 3, 32, 32)
    assert src(x).shape == (2, 5)
    assert src.features(x).shape == (2, src.feature_dim)
    assert [n for n, _ in src.named_blocks()] == [f"backbone.{b}" for b in blocks]


def test_same_function_as_timm_model(pair):
    """The block split computes exactly what timm's model computes with the same weights."""
    name, _, _, src, _ = pair
    ref = timm.create_model(name, num_classes=5, **({"img_size": 32} if "vit" in name else {}))
    ref.load_state_dict(timm_state_dict(src))  # strict: every tensor has its timm name
    src.eval(), ref.eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(src(x), ref(x), rtol=1e-4, atol=1e-5)


def test_partial_transfers_and_freezes_first_blocks(pair):
    name, blocks, _, src, tgt = pair
    model = Partial(blocks=2).build(src, tgt)
    for b in blocks[:2]:
        s, t = src.get_submodule(f"backbone.{b}"), model.get_submodule(f"backbone.{b}")
        assert all(torch.equal(p, q) and not q.requires_grad
                   for p, q in zip(s.parameters(), t.parameters()))
    later, src_later = (m.get_submodule(f"backbone.{blocks[3]}") for m in (model, src))
    assert all(p.requires_grad for p in later.parameters())
    assert any(not torch.equal(p, q) for p, q in zip(later.parameters(), src_later.parameters()))


def test_lora_wraps_and_starts_as_source(pair):
    name, _, lora_layers, src, tgt = pair
    import copy

    strategy = LoRA(r=2, layers=lora_layers)
    model = strategy.build(src, copy.deepcopy(tgt))
    if lora_layers:  # ViT: exactly the 12 attention qkv projections
        assert strategy.wrapped == [f"backbone.blocks_{i}.attn.qkv" for i in range(12)]
    trainable = {n.split(".")[-1] for n, p in model.named_parameters() if p.requires_grad
                 and not n.startswith("head.")}
    assert trainable == {"lora_A", "lora_B"}
    src.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), src.features(x), rtol=1e-4, atol=1e-5)


def test_adapter_wraps_every_block_and_starts_as_source(pair):
    """Adapters go after every block — feature maps on CNNs, (N, T, D) tokens on a ViT — and
    start as the identity (up-projection at zero), so the adapted model is the source."""
    import copy

    name, blocks, _, src, tgt = pair
    strategy = Adapter()
    model = strategy.build(src, copy.deepcopy(tgt))
    if "vit" in name:  # every transformer block's tokens get an adapter (failed before: 3-D outputs)
        assert {f"backbone.blocks_{i}" for i in range(12)} <= set(strategy.wrapped)
    assert strategy.wrapped
    src.eval(), model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), src.features(x), rtol=1e-4, atol=1e-5)


# --- local weights ---------------------------------------------------------------------------------
def test_local_safetensors_and_pth_load_into_the_backbone(tmp_path):
    torch.manual_seed(7)
    net = timm.create_model("resnet18", num_classes=10)  # a 10-class classifier: dropped
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    for f in ("r18.safetensors", "r18.pth"):
        m = build("resnet18", weights=str(tmp_path / f))
        assert torch.equal(m.backbone.conv1.weight, net.conv1.weight)
        assert torch.equal(m.backbone.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
        assert m.head.out_features == 5


def test_wrong_architecture_file_is_one_line_naming_file_and_key(tmp_path):
    f = tmp_path / "r18.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), str(f))
    with pytest.raises(ConfigError) as e:
        build("resnet34", weights=str(f))
    msg = str(e.value)
    assert str(f) in msg and "layer1.2.conv1.weight" in msg and "\n" not in msg


def test_shape_mismatch_is_named(tmp_path):
    state = timm.create_model("resnet18", num_classes=0).state_dict()
    state["layer2.0.conv1.weight"] = torch.zeros(1, 1, 3, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match=r"bad.safetensors: layer2.0.conv1.weight has shape \(1, 1, 3, 3\)"):
        build("resnet18", weights=str(tmp_path / "bad.safetensors"))


def test_pickle_that_runs_code_is_refused(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1), "x": ConfigError("boom")}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match="refused to load"):
        build("resnet18", weights=str(tmp_path / "evil.pth"))


@pytest.mark.slow
def test_vit_224_weights_load_at_32_and_grey(tmp_path):
    """timm's checkpoint filter resizes the position embedding; grey input sums the RGB filters."""
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", num_classes=1000)
    save_file(net.state_dict(), str(tmp_path / "vit.safetensors"))
    m = build("vit_tiny_patch16_224", c=1, weights=str(tmp_path / "vit.safetensors"))
    assert m.backbone.tokens.pos_embed.shape == (1, 1 + 4, 192)
    assert torch.equal(m.backbone.blocks_3.attn.qkv.weight, net.blocks[3].attn.qkv.weight)
    torch.testing.assert_close(m.backbone.patch_embed.proj.weight,
                               net.patch_embed.proj.weight.sum(1, keepdim=True))


def test_cache_reads_hub_snapshot_and_says_when_absent(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match="model.weights=cache: no cached weights for timm resnet18"):
        build("resnet18", weights="cache")
    repo = tmp_path / "hub" / "models--timm--resnet18.a1_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    torch.manual_seed(3)
    net = timm.create_model("resnet18", num_classes=1000)
    save_file(net.state_dict(), str(repo / "snapshots" / "abc123" / "model.safetensors"))
    m = build("resnet18", weights="cache")
    assert torch.equal(m.backbone.conv1.weight, net.conv1.weight)
    assert m.weights_file == str(repo / "snapshots" / "abc123" / "model.safetensors")
    assert m.data_config["mean"] == pytest.approx([0.485, 0.456, 0.406])


def test_unknown_name_is_one_line():
    with pytest.raises(ConfigError, match="model.name='resnet18x': not a timm model"):
        build("resnet18x")


# --- statistics the weights declare ----------------------------------------------------------------
def test_data_config_follows_weights_and_overrides(tmp_path):
    f = tmp_path / "z.safetensors"
    save_file(timm.create_model("convnext_zepto_rms", num_classes=0).state_dict(), str(f))
    assert build("convnext_zepto_rms").data_config is None  # random init: the dataset's statistics
    m = build("convnext_zepto_rms", weights=str(f))
    assert m.data_config == {"mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 224, 224],
                             "interpolation": "bicubic", "source": "timm:convnext_zepto_rms"}
    cfg = {"_target_": "transfer_lab.models.timm_model", "name": "convnext_zepto_rms",
           "weights": str(f), "mean": None, "std": None}
    assert model_data_config(cfg) == m.data_config  # the run can ask before building
    assert model_data_config(cfg, in_channels=1)["mean"] == [0.5]
    own = model_data_config({**cfg, "mean": [0.1, 0.2, 0.3], "std": [0.3, 0.3, 0.3]})
    assert own["mean"] == [0.1, 0.2, 0.3] and own["source"] == "model.mean/std"
    assert model_data_config({"_target_": "transfer_lab.models.convnet", "channels": [8]}) is None


def test_split_keeps_one_block_when_children_do_not_chain():
    """A forward that is not its children in order (a residual here) is never split wrongly."""
    from torch import nn

    from transfer_lab.models.timm_blocks import split_blocks

    class Residual(nn.Module):
        def __init__(self, residual: bool):
            super().__init__()
            self.a, self.b, self.residual = nn.Linear(4, 4), nn.Linear(4, 4), residual

        def forward(self, x):
            return self.b(self.a(x)) + (x if self.residual else 0)

    chained, dim = split_blocks(Residual(False), (4,))
    assert list(chained._modules) == ["a", "b"] and dim == 4
    whole, _ = split_blocks(Residual(True), (4,))
    assert list(whole._modules) == ["model"] and whole.timm_keys["model.a.weight"] == "a.weight"


def test_exported_model_loads_back_as_it_is(tmp_path):
    """timm_state_dict → weights=: the same function, head included when the classes fit."""
    src = build("resnet18", k=4, seed=2)
    save_file(timm_state_dict(src), str(tmp_path / "mine.safetensors"))
    same = build("resnet18", k=4, seed=9, weights=str(tmp_path / "mine.safetensors"))
    other = build("resnet18", k=3, seed=9, weights=str(tmp_path / "mine.safetensors"))
    assert same.head_from_weights and not other.head_from_weights
    src.eval(), same.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(same(x), src(x))
    assert torch.equal(other.backbone.layer2[0].conv1.weight, src.backbone.layer2[0].conv1.weight)
