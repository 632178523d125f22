from torch import nn

from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy, copy_backbone, freeze


class LinearProbe(Strategy):
    """Feature transfer: the source backbone, frozen (weights and BatchNorm statistics), as a
    feature extractor; only the new head trains."""

    tasks = ("classification", "regression")

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "linear_probe")
        freeze(target.backbone)
        return target
