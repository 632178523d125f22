"""Strategies: one file each; ``conf/strategy/<name>.yaml`` names the class by ``_target_``."""

from transfer_lab.strategies.base import Strategy

__all__ = ["Strategy"]
