"""Initialise a target of a *different* architecture from the source, then fine-tune everything.

Optionally the source is first grown with Net2Net (``widen``, then ``deepen``) so it computes the
same function in a bigger shape; then every target layer is matched to a source layer by name,
then by order within type, and copied, adapted (sliced/tiled) or left at its fresh init
(``transfer_lab.transfer``). The per-layer report is printed and stored in results.json.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.transfer import (check_function, format_report, net2deeper, net2wider, summarize,
                                  transfer_weights)


class WeightTransfer(Strategy):
    """Cross-architecture weight transfer by layer matching, optionally after Net2Net growth.

    Args:
        widen: Net2Wider steps applied to the source in order, ``[[layer_path, width], ...]``
            (e.g. ``[[backbone.conv1.0, 32], [backbone.conv2.0, 64]]``).
        deepen: Net2Deeper steps, block paths after which an identity block is inserted
            (e.g. ``[backbone.conv2]``); the new block is named ``<block>_deeper``.
        noise: Net2Wider symmetry-breaking noise (relative std; 0 keeps the function exactly).
        include_head: transfer the classifier head too (only meaningful when the target task
            has the source's classes); by default the head keeps its fresh init.
    """

    def __init__(self, widen: list[list[Any]] | None = None, deepen: list[str] | None = None,
                 noise: float = 0.0, include_head: bool = False) -> None:
        super().__init__()
        self.widen = []
        for step in widen or []:
            if len(step) != 2:
                raise ConfigError(f"strategy.widen: each step is [layer_path, width]; got {step}")
            self.widen.append((str(step[0]), int(step[1])))
        self.deepen = [str(d) for d in deepen or []]
        self.noise, self.include_head = noise, include_head
        self.rows: list[dict[str, Any]] = []

    def grow(self, source: Classifier) -> Classifier:
        """The source after the configured Net2Net steps (a new model; the source is untouched).
        Each step is checked to run and, without noise, to keep the source's function."""
        for layer, width in self.widen:
            grown = net2wider(source, layer, width, noise=self.noise)
            check_function(source, grown, f"strategy.widen=[{layer}, {width}]", exact=not self.noise)
            source = grown
        for after in self.deepen:
            grown = net2deeper(source, after)
            check_function(source, grown, f"strategy.deepen=[{after}]")
            source = grown
        return source

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        if source is None:
            raise ConfigError("strategy=weight_transfer needs a source model")
        grown = self.grow(source)
        self.rows = transfer_weights(grown, target, exclude=() if self.include_head else ("head",))
        print(f"weight_transfer: source → target, layer by layer\n{format_report(self.rows)}",
              flush=True)
        return target

    def report(self) -> dict[str, Any]:
        return {"summary": summarize(self.rows), "layers": self.rows,
                "net2net": {"widen": [list(s) for s in self.widen], "deepen": self.deepen,
                            "noise": self.noise}}
