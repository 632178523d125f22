from torch import nn

from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import copy_backbone, freeze


class LinearProbe(Strategy):
    """Feature transfer: the source backbone, frozen (weights; BatchNorm statistics and Dropout
    in eval mode), as a feature extractor; only the new head trains.

    Args:
        train_bn: let BatchNorm statistics in the frozen backbone update.
    """

    tasks = ("classification", "regression")

    def __init__(self, train_bn: bool = False) -> None:
        super().__init__()
        self.train_bn = train_bn

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "linear_probe")
        freeze(target.backbone)
        return target
