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
