from torch import nn

from transfer_lab.errors import ConfigError
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import freeze, match_modules


class Partial(Strategy):
    """Transfer (and optionally freeze) a chosen set of layers; the rest keep a fresh init.

    Args:
        blocks: transfer the first ``blocks`` backbone blocks (see ``Classifier.named_blocks``).
        layers: or module-path globs, e.g. ``["backbone.conv1*", "backbone.conv2.0"]``.
        freeze_transferred: freeze what was transferred (weights; BatchNorm statistics and
            Dropout held in eval mode).
        train_bn: let BatchNorm statistics in the frozen layers update.
    """

    tasks = ("classification", "regression")

    def __init__(self, blocks: int | None = 1, layers: list[str] | None = None,
                 freeze_transferred: bool = True, train_bn: bool = False) -> None:
        super().__init__()
        self.train_bn = train_bn
        if (blocks is None) == (not layers):
            raise ConfigError("strategy: partial needs exactly one of strategy.blocks or "
                              f"strategy.layers (got blocks={blocks}, layers={layers})")
        self.blocks, self.layers, self.freeze_transferred = blocks, list(layers or []), freeze_transferred
        self.transferred: list[str] = []

    def chosen(self, model: Classifier) -> list[str]:
        if self.layers:
            return match_modules(model, self.layers, "strategy.layers")
        named = model.named_blocks()
        if not 0 <= self.blocks <= len(named):
            raise ConfigError(f"strategy.blocks={self.blocks}: the backbone has {len(named)} "
                              f"blocks ({', '.join(n for n, _ in named)})")
        return [n for n, _ in named[: self.blocks]]

    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        if source is None:
            raise ConfigError("strategy=partial needs a source model")
        self.transferred = self.chosen(target)
        src_names = {n for n, _ in source.named_modules()}
        missing = [n for n in self.transferred if n not in src_names]
        if missing:
            raise ConfigError(f"strategy=partial: {missing[0]} exists in the target but not in the "
                              f"source ({len(missing)} chosen module(s) missing: {', '.join(missing[:4])})")
        for name in self.transferred:
            src, tgt = source.get_submodule(name), target.get_submodule(name)
            try:
                tgt.load_state_dict(src.state_dict())
            except RuntimeError as e:
                raise ConfigError(f"strategy=partial: {name} differs between source and target "
                                  f"({str(e).splitlines()[-1].strip()})") from None
            if self.freeze_transferred:
                freeze(tgt)
        return target

    def report(self) -> dict:
        return {"transferred": self.transferred, "frozen": self.freeze_transferred}
