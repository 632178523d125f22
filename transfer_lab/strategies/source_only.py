"""The domain-adaptation baseline: train on the source domain only, test on the target."""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from transfer_lab.data.paired import PairedData
from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.selection import check_validate_on, validation_data
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import copy_model


class SourceOnly(Strategy):
    """Start from the source model and keep training on labelled source data only.

    Same init, source batches, epochs and evaluation on the target test set as ``dann``, without
    target images or the domain loss: the gap to ``dann`` is the adaptation.

    Args:
        validate_on: ``target`` (its labelled validation split) or ``source`` (no target label used).
    """

    def __init__(self, validate_on: str = "target") -> None:
        super().__init__()
        self.validate_on = check_validate_on(validate_on, "source_only")

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        copy_model(source, target, "source_only")
        return target

    def datamodule(self, target_dm: L.LightningDataModule,
                   source_dm: L.LightningDataModule | None) -> L.LightningDataModule:
        if source_dm is None:
            raise ConfigError("strategy=source_only trains on the source data; a source.checkpoint "
                              "without source data cannot be used")
        return PairedData(source_dm, evaluate=target_dm,
                          validate=validation_data(self.validate_on, target_dm, source_dm))

    def report(self) -> dict[str, Any]:
        return {"init": "source model", "trained_on": "source train split only",
                "validate_on": self.validate_on}
