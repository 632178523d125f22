from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.errors import ConfigError
from transfer_lab.data.sources import EmbeddedMNIST, NpzData, SyntheticData, TorchvisionData

__all__ = ["ConfigError", "EmbeddedMNIST", "NpzData", "SyntheticData", "TorchvisionData",
           "TransferDataModule"]
