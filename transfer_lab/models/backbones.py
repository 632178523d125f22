"""Backbone factories. Each returns a ``Classifier``; config keys are exactly their arguments.

``in_channels``, ``image_size`` and ``num_classes`` are wired in by the run from the data, so a
model YAML only states the architecture.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier, linear_head
from transfer_lab.models.weights import is_weights_file, load_head, load_strict, stats_config


def mlp(in_channels: int, image_size: int, num_classes: int, hidden: Sequence[int] = (256, 256),
        dropout: float = 0.0, batch_norm: bool = False) -> Classifier:
    """Fully connected net on flattened images: one block per hidden layer."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict(flatten=nn.Flatten())
    width = in_channels * image_size * image_size
    for i, h in enumerate(hidden):
        layers: list[nn.Module] = [nn.Linear(width, h)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(nn.ReLU(inplace=True))
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        blocks[f"fc{i + 1}"] = nn.Sequential(*layers)
        width = h
    return Classifier(nn.Sequential(blocks), linear_head(width, num_classes), width,
                      (in_channels, image_size, image_size))


def lenet(in_channels: int, image_size: int, num_classes: int) -> Classifier:
    """LeNet-5 shape (6-16 convs, 120-84 fully connected); pools to 5x5 at any input size."""
    backbone = nn.Sequential(OrderedDict(
        conv1=nn.Sequential(nn.Conv2d(in_channels, 6, 5, padding=2), nn.ReLU(inplace=True),
                            nn.MaxPool2d(2)),
        conv2=nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(inplace=True),
                            nn.AdaptiveAvgPool2d(5), nn.Flatten()),
        fc1=nn.Sequential(nn.Linear(16 * 25, 120), nn.ReLU(inplace=True)),
        fc2=nn.Sequential(nn.Linear(120, 84), nn.ReLU(inplace=True)),
    ))
    return Classifier(backbone, linear_head(84, num_classes), 84,
                      (in_channels, image_size, image_size))


def convnet(in_channels: int, image_size: int, num_classes: int,
            channels: Sequence[int] = (32, 64, 128), batch_norm: bool = True) -> Classifier:
    """Small CNN: conv-BN-ReLU-maxpool per block, global average pool at the end."""
    blocks: OrderedDict[str, nn.Module] = OrderedDict()
    c_in = in_channels
    for i, c in enumerate(channels):
        layers: list[nn.Module] = [nn.Conv2d(c_in, c, 3, padding=1, bias=not batch_norm)]
        if batch_norm:
            layers.append(nn.BatchNorm2d(c))
        layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2) if i < len(channels) - 1
                   else nn.Identity()]
        blocks[f"conv{i + 1}"] = nn.Sequential(*layers)
        c_in = c
    blocks["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(nn.Sequential(blocks), linear_head(c_in, num_classes), c_in,
                      (in_channels, image_size, image_size))


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., 2016) with a 1x1 projection shortcut when shapes change."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                          nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet_cifar(in_channels: int, image_size: int, num_classes: int, depth: int = 20,
                 width: int = 16) -> Classifier:
    """ResNet-(6n+2) for 32x32 inputs (He et al., 2016, sec. 4.2): 3 stages of n blocks.

    Blocks are ``stem``, then one per stage (``stage1``..``stage3``), then ``pool``.
    """
    if (depth - 2) % 6 != 0 or depth < 8:
        raise ValueError(f"model.depth={depth}: resnet_cifar needs depth = 6n+2 (8, 14, 20, 32, 56, ...)")
    n = (depth - 2) // 6
    blocks: OrderedDict[str, nn.Module] = OrderedDict(
        stem=nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)))
    c = width
    for s in range(3):
        c_out = width * 2 ** s
        stage = [BasicBlock(c if i == 0 else c_out, c_out, 2 if (i == 0 and s > 0) else 1)
                 for i in range(n)]
        blocks[f"stage{s + 1}"] = nn.Sequential(*stage)
        c = c_out
    blocks["pool"] = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Classifier(nn.Sequential(blocks), linear_head(c, num_classes), c,
                      (in_channels, image_size, image_size))


def torchvision_model(in_channels: int, image_size: int, num_classes: int, arch: str = "resnet18",
                      weights: str | None = None, checkpoint: str | None = None,
                      mean: list[float] | None = None, std: list[float] | None = None) -> Classifier:
    """A torchvision classification model split into blocks, with optional pretrained weights.

    The classifier's hidden layers (MobileNetV3's 576→1024 Linear + Hardswish, VGG's 4096-wide
    layers) are pretrained features, so they are a backbone block (``hidden``) and transfer with
    it; the head is the last Linear (with the dropout just before it).

    Args:
        arch: a ``torchvision.models`` builder name (``resnet18``, ``resnet50``, ``mobilenet_v3_small``).
        weights: torchvision weights name (e.g. ``IMAGENET1K_V1``; needs the network once), or a
            local weights file (``.safetensors``, ``.pth``, ``.bin``: read weights-only, keys and
            shapes strict against the torchvision model; its final Linear becomes the head when
            it has ``num_classes`` outputs, and may otherwise have any size or be absent).
        checkpoint: the same as a local ``weights`` file (kept for existing configs).
        mean, std: input statistics of the weights (a torchvision weights name brings its own).
    """
    import torchvision

    builders = torchvision.models.list_models(module=torchvision.models)
    if arch not in builders:
        raise ValueError(f"model.arch={arch!r} is not a torchvision classifier; valid: "
                         f"{', '.join(sorted(builders))}")
    local, key = _local_weights(weights, checkpoint)
    net = torchvision.models.get_model(arch, weights=None if local else weights)
    classifier, last = {}, _last_linear(net)
    if local:
        from transfer_lab.io import read_weights

        classifier = load_strict(net, read_weights(local, f"model.{key}"), f"model.{key}={local}",
                                 f"torchvision {arch}", skip=(last,))
    if in_channels != 3:
        _adapt_first_conv(net, in_channels)
    children = OrderedDict(net.named_children())
    head = children.pop("fc" if "fc" in children else "classifier")
    children["flatten"] = nn.Flatten()
    new_head, feature_dim = _split_classifier(head, children, num_classes)
    model = Classifier(nn.Sequential(children), new_head, feature_dim,
                       (in_channels, image_size, image_size))
    model.data_config = torchvision_data_config(arch, weights, checkpoint, mean, std, in_channels)
    model.weights_file = local  # the local file the weights came from (None: named or random)
    model.head_from_weights = load_head(model.head, classifier, last)  # the file's classes fit
    return model


def _split_classifier(head: nn.Module, children: OrderedDict,
                      num_classes: int) -> tuple[nn.Module, int]:
    """Hidden classifier layers join the backbone (``children["hidden"]``): they are features
    the source learnt, so they transfer. Returns the new head (the dropout before the last
    Linear, if any, and a fresh Linear) and the feature width."""
    layers = list(head.children()) if isinstance(head, nn.Sequential) else [head]
    last = max(i for i, m in enumerate(layers) if isinstance(m, nn.Linear))
    cut = last - 1 if last > 0 and isinstance(layers[last - 1], nn.Dropout) else last
    if layers[:cut]:
        children["hidden"] = nn.Sequential(*layers[:cut])
    dim = layers[last].in_features
    new_head = nn.Linear(dim, num_classes)
    return (nn.Sequential(*layers[cut:last], new_head) if cut < last else new_head), dim


def _last_linear(net: nn.Module) -> str:
    """Path of the classifier's final Linear (replaced by the new head, so not loaded)."""
    return [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]


def _local_weights(weights: str | None, checkpoint: str | None) -> tuple[str | None, str]:
    if is_weights_file(weights):
        if checkpoint:
            raise ConfigError(f"model.weights={weights} and model.checkpoint={checkpoint}: "
                              "give one weights file")
        return weights, "weights"
    if checkpoint and weights:
        raise ConfigError(f"model.weights={weights} and model.checkpoint={checkpoint}: "
                          "a local checkpoint replaces the named weights; set one")
    return checkpoint, "checkpoint"


def torchvision_data_config(arch: str = "resnet18", weights: str | None = None,
                            checkpoint: str | None = None, mean: list[float] | None = None,
                            std: list[float] | None = None, in_channels: int = 3,
                            **_: object) -> dict | None:
    """A named torchvision weight's own statistics and crop size; for a local file only what
    ``mean``/``std`` say (its training data is not known here)."""
    if weights is not None and not is_weights_file(weights):
        import torchvision

        tf = torchvision.models.get_model_weights(arch)[weights].transforms()
        return stats_config(mean or tf.mean, std or tf.std, tf.crop_size * 2,
                            tf.interpolation.value, f"torchvision:{arch}.{weights}", in_channels)
    if mean is None and std is None:
        return None
    if mean is None or std is None:
        raise ConfigError(f"model.mean={mean}, model.std={std}: give both")
    return stats_config(mean, std, None, "bilinear", "model.mean/std", in_channels)


torchvision_model.data_config = torchvision_data_config


def _adapt_first_conv(net: nn.Module, in_channels: int) -> None:
    """Grey/other-channel input for an RGB net: average (or tile) the first conv's input weights."""
    for name, m in net.named_modules():
        if isinstance(m, nn.Conv2d) and m.in_channels == 3:
            w = m.weight.detach()
            new = nn.Conv2d(in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                            bias=m.bias is not None)
            mean = w.mean(dim=1, keepdim=True)
            new.weight.data.copy_(mean.repeat(1, in_channels, 1, 1) * 3 / in_channels)
            if m.bias is not None:
                new.bias.data.copy_(m.bias.detach())
            parent = net.get_submodule(name.rsplit(".", 1)[0]) if "." in name else net
            setattr(parent, name.rsplit(".", 1)[-1], new)
            return
