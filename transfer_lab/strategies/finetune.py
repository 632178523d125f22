from torch import nn

from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import copy_backbone


class Finetune(Strategy):
    """Parameter transfer: copy every source backbone weight, new head, train everything."""

    tasks = ("classification", "regression")

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_backbone(source, target, "finetune")
        return target
