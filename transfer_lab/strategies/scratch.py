from torch import nn

from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy


class Scratch(Strategy):
    """The baseline: the target architecture from random initialisation (no source needed)."""

    tasks = ("classification", "regression")
    needs_source = False

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        return target
