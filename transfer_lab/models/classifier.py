"""The one model shape every strategy relies on: ``Classifier(backbone, head)``."""

from __future__ import annotations

import torch
from torch import nn


class Classifier(nn.Module):
    """A backbone that maps inputs to ``(N, D)`` features and a head that maps ``D`` to classes.

    The backbone is an ``nn.Sequential`` whose children are the *blocks*, ordered from input to
    output. Layer-wise strategies (partial transfer, discriminative LRs, gradual unfreezing)
    address blocks by index or by their name in ``named_blocks()``.

    Args:
        backbone: module mapping a batch to ``(N, feature_dim)`` features.
        head: module mapping features to logits.
        feature_dim: width ``D`` of the features.
        input_shape: ``(C, H, W)`` the model was built for (recorded so it can be rebuilt).
    """

    def __init__(self, backbone: nn.Sequential, head: nn.Module, feature_dim: int,
                 input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_dim = feature_dim
        self.input_shape = tuple(input_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        """Backbone blocks that hold parameters, input to output, as ``("backbone.<name>", m)``."""
        return [(f"backbone.{n}", m) for n, m in self.backbone.named_children()
                if any(True for _ in m.parameters())]

    @property
    def num_classes(self) -> int:
        last = [m for m in self.head.modules() if isinstance(m, nn.Linear)][-1]
        return last.out_features


def linear_head(feature_dim: int, num_classes: int) -> nn.Module:
    return nn.Linear(feature_dim, num_classes)
