"""Every model: output shape, feature width, blocks in order."""

import pytest
import torch

from transfer_lab.models import Classifier, convnet, lenet, mlp, resnet_cifar, torchvision_model

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


def test_mobilenet_keeps_hidden_head_layers():
    m = torchvision_model(3, 32, 4, arch="mobilenet_v3_small")
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 4)
