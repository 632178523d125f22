"""Every model: output shape, feature width, blocks in order."""

import pytest
import torch

from transfer_lab.errors import ConfigError
from transfer_lab.models import (Classifier, convnet, lenet, mlp, model_data_config, resnet_cifar,
                                 torchvision_model)

CASES = [
    (mlp, dict(hidden=[32, 16]), (1, 28, 28)),
    (lenet, {}, (1, 28, 28)),
    (lenet, {}, (3, 32, 32)),
    (convnet, dict(channels=[8, 16]), (3, 32, 32)),
    (resnet_cifar, dict(depth=8, width=8), (3, 32, 32)),
    (torchvision_model, dict(arch="resnet18"), (3, 32, 32)),
    (torchvision_model, dict(arch="resnet18"), (1, 32, 32)),
]


@pytest.mark.parametrize("factory, kw, shape", CASES)
def test_output_and_feature_shapes(factory, kw, shape):
    m = factory(in_channels=shape[0], image_size=shape[-1], num_classes=7, **kw)
    assert isinstance(m, Classifier)
    x = torch.randn(2, *shape)
    assert m(x).shape == (2, 7)
    assert m.features(x).shape == (2, m.feature_dim)
    assert len(m.named_blocks()) >= 2 and m.num_classes == 7


def test_resnet_depth_is_checked():
    with pytest.raises(ValueError, match="depth=10"):
        resnet_cifar(3, 32, 10, depth=10)
    with pytest.raises(ValueError, match="arch='resnet9000'"):
        torchvision_model(3, 32, 10, arch="resnet9000")


def test_torchvision_local_checkpoint_is_loaded(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    torch.manual_seed(3)
    net = torchvision.models.resnet18()
    save_file(net.state_dict(), str(tmp_path / "r18.safetensors"))
    m = torchvision_model(3, 32, 5, arch="resnet18", checkpoint=str(tmp_path / "r18.safetensors"))
    assert torch.equal(m.backbone.conv1.weight, net.conv1.weight)
    assert torch.equal(m.backbone.layer4[1].bn2.running_var, net.layer4[1].bn2.running_var)
    assert m.head.out_features == 5


def test_torchvision_local_weights_file_strict(tmp_path):
    """weights=<file> like checkpoint=: .pth read weights-only; the final Linear may have any classes."""
    import torchvision

    torch.manual_seed(4)
    net = torchvision.models.resnet18(num_classes=10)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    m = torchvision_model(3, 32, 5, arch="resnet18", weights=str(tmp_path / "r18.pth"))
    assert torch.equal(m.backbone.layer3[0].conv2.weight, net.layer3[0].conv2.weight)
    assert m.weights_file == str(tmp_path / "r18.pth")
    assert not m.head_from_weights  # 10 classes in the file, 5 here: a new head
    as_is = torchvision_model(3, 32, 10, arch="resnet18", weights=str(tmp_path / "r18.pth"))
    assert as_is.head_from_weights and torch.equal(as_is.head.weight, net.fc.weight)
    with pytest.raises(ConfigError) as e:
        torchvision_model(3, 32, 5, arch="resnet50", weights=str(tmp_path / "r18.pth"))
    assert str(tmp_path / "r18.pth") in str(e.value) and "layer1.0.conv1.weight has shape (64, 64, 3, 3)" in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="give one weights file"):
        torchvision_model(3, 32, 5, weights=str(tmp_path / "r18.pth"), checkpoint=str(tmp_path / "r18.pth"))


def test_torchvision_named_weights_declare_their_statistics():
    cfg = {"_target_": "transfer_lab.models.torchvision_model", "arch": "resnet18",
           "weights": "IMAGENET1K_V1", "checkpoint": None}
    dc = model_data_config(cfg)  # no download: the weights enum knows its transforms
    assert dc["mean"] == pytest.approx([0.485, 0.456, 0.406]) and dc["input_size"] == [3, 224, 224]
    assert model_data_config({**cfg, "weights": None}) is None
    own = model_data_config({**cfg, "weights": "mine.safetensors", "mean": [0.5] * 3, "std": [0.2] * 3})
    assert own["mean"] == [0.5] * 3 and own["input_size"] is None  # a local file's size is unknown


def test_mobilenet_hidden_layer_is_backbone_and_transfers():
    """issue 13: MobileNetV3's 576→1024 Linear was head (39% of its parameters never transferred)."""
    from transfer_lab.strategies.common import copy_backbone

    torch.manual_seed(0)
    src = torchvision_model(3, 32, 4, arch="mobilenet_v3_small")
    tgt = torchvision_model(3, 32, 6, arch="mobilenet_v3_small")
    assert tgt(torch.randn(2, 3, 32, 32)).shape == (2, 6) and tgt.feature_dim == 1024
    head = sum(p.numel() for p in tgt.head.parameters())
    assert head == 1024 * 6 + 6  # the new classifier only
    copy_backbone(src, tgt, "finetune")
    hidden = [m for m in tgt.backbone.modules() if isinstance(m, torch.nn.Linear)]
    assert hidden and torch.equal(hidden[0].weight, src.backbone.hidden[0].weight)
    assert "backbone.hidden" in [n for n, _ in tgt.named_blocks()]
