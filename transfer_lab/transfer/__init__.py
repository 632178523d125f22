"""Weight transfer between architectures: layer matching with width adaptation, and Net2Net."""

from transfer_lab.transfer.matching import format_report, match_layers, summarize, transfer_weights
from transfer_lab.transfer.net2net import check_function, net2deeper, net2wider

__all__ = ["check_function", "format_report", "match_layers", "net2deeper", "net2wider", "summarize",
           "transfer_weights"]
