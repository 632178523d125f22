"""Which strategies train as K stacked seeds, and the loss of one seed inside ``vmap``.

The adapter surface between the vectorised engine and the strategies: freezing and param groups
are read from the built models and ``param_groups`` as they are, and a seed's loss terms come from
the strategy's own ``loss`` hook, called on a functional view of that seed's model (``SeedLoss``).
Only what cannot run under ``vmap`` is re-stated here: L2-SP's penalty (``L2SPLoss``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from transfer_lab.strategies.adapter import Adapter
from transfer_lab.strategies.base import Loss, Strategy, TaskLoss
from transfer_lab.strategies.discriminative import Discriminative
from transfer_lab.strategies.distill import Distill
from transfer_lab.strategies.finetune import Finetune
from transfer_lab.strategies.l2sp import L2SP
from transfer_lab.strategies.linear_probe import LinearProbe
from transfer_lab.strategies.lora import LoRA
from transfer_lab.strategies.partial import Partial
from transfer_lab.strategies.scratch import Scratch
from transfer_lab.strategies.weight_transfer import WeightTransfer
from transfer_lab.vectorized.modes import unbind_all

# optimizers whose update of a tensor element reads only that element's gradient and state:
# K stacked models under one of them are K independent trainings
ELEMENTWISE_OPTIMIZERS = ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")

# strategies that are not in the table, and why (anything else unknown falls back too)
NOT_VECTORISABLE = {
    "DANN": "trains on two streams (target and source batches) with a discriminator of its own",
    "Multitask": "trains on two streams (target and source batches) with two heads",
    "GradualUnfreeze": "its callback changes requires_grad during training; stacked parameters "
                       "are fixed at the start",
    "SourceOnly": "trains on a paired source/target data module (DomainData), not the target's",
}


class SeedModel:
    """One seed's model inside ``vmap``: the template's forward on that seed's tensors. It is
    what a strategy's ``loss(model, batch, task_loss)`` receives in place of the model."""

    def __init__(self, template: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        self.template, self.tensors = template, tensors

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, self.tensors, (x,))


class SeedLoss:
    """One seed's loss terms: the strategy's own ``loss`` on the seed's ``SeedModel`` (scratch,
    finetune, linear_probe, partial, discriminative, adapter, lora, weight_transfer: the base
    ``Strategy.loss``; distill: its own, fed the teacher's logits as its cached-logits batch).

    Override ``aux`` for K-stacked constant tensors a seed's loss needs (moved with the module),
    ``extra`` for per-seed batch items computed outside ``vmap``, ``loss`` for a strategy whose
    own ``loss`` cannot run under ``vmap``.
    """

    #: the module runs the seeds one after the other (``vectorize_mode=loop``): ``extra`` does too
    per_seed = False

    def __init__(self, strategies: list[Strategy], models: list[nn.Module], template: nn.Module) -> None:
        self.strategies, self.strategy, self.template = strategies, strategies[0], template

    def aux(self) -> dict[str, torch.Tensor]:
        return {}

    def extra(self, x: torch.Tensor, aux: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """K×… batch items appended to each seed's ``(x, y)`` (outside ``vmap``)."""
        return ()

    def loss(self, params: dict[str, torch.Tensor], aux: dict[str, torch.Tensor], batch: tuple,
             task_loss: TaskLoss) -> Loss:
        return self.strategy.loss(SeedModel(self.template, params), batch, task_loss)


class L2SPLoss(SeedLoss):
    """``L2SP.loss`` re-stated for ``vmap`` (its ``penalty`` skips parameters whose
    ``requires_grad`` is False, and under ``vmap`` every parameter reads False): the task term
    plus ``alpha/2·‖w − w_src‖²`` (each seed's own source) + ``beta/2·‖w‖²`` (the rest), summed
    in ``named_parameters`` order as ``L2SP.penalty`` sums."""

    def __init__(self, strategies: list[Strategy], models: list[nn.Module], template: nn.Module) -> None:
        super().__init__(strategies, models, template)
        self.trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
        self.refs = {n: torch.stack([s.reference[n] for s in strategies])
                     for n in self.trainable if n in self.strategy.reference}

    def aux(self) -> dict[str, torch.Tensor]:
        return {f"ref:{n}": t for n, t in self.refs.items()}

    def loss(self, params, aux, batch, task_loss):
        out = Strategy.loss(self.strategy, SeedModel(self.template, params), batch, task_loss)
        pull = new = None
        for n in self.trainable:
            if n in self.refs:
                term = (params[n] - aux[f"ref:{n}"]).pow(2).sum()
                pull = term if pull is None else pull + term
            else:
                term = params[n].pow(2).sum()
                new = term if new is None else new + term
        zero = params[self.trainable[0]].new_zeros(())
        s = self.strategy
        penalty = (0.5 * s.alpha * (zero if pull is None else pull)
                   + 0.5 * s.beta * (zero if new is None else new))
        return Loss({**out.terms, "l2sp": penalty}, out.outputs, out.target)


class DistillLoss(SeedLoss):
    """``Distill.loss`` itself, on ``(x, y, teacher_logits)``: its cached-logits batch layout.
    Each seed's teacher (stacked, vmapped) sees that seed's ``teacher_input`` (its own data
    statistics), computed per seed outside ``vmap`` (it branches on the statistics' values)."""

    def __init__(self, strategies: list[Strategy], models: list[nn.Module], template: nn.Module) -> None:
        super().__init__(strategies, models, template)
        self.teacher = copy.deepcopy(self.strategy.teacher).eval()
        states = [{**dict(s.teacher.named_parameters()), **dict(s.teacher.named_buffers())}
                  for s in strategies]
        self.stacked = {n: torch.stack([st[n].detach() for st in states]) for n in states[0]}

    def aux(self) -> dict[str, torch.Tensor]:
        return {f"teacher:{n}": t for n, t in self.stacked.items()}

    @torch.no_grad()
    def extra(self, x, aux):
        if not self.strategy.kd_weight:  # Distill.loss runs no teacher then
            return ()
        inputs = torch.stack([s.teacher_input(x[k]) for k, s in enumerate(self.strategies)])
        state = {n: aux[f"teacher:{n}"] for n in self.stacked}
        if self.per_seed:
            return (torch.stack([functional_call(self.teacher, p, (xk,))
                                 for p, xk in zip(unbind_all(state, len(inputs)), inputs.unbind(0))]),)
        return (vmap(lambda p, xk: functional_call(self.teacher, p, (xk,)))(state, inputs),)


TERMS: dict[type, type[SeedLoss]] = {
    Scratch: SeedLoss, Finetune: SeedLoss, LinearProbe: SeedLoss, Partial: SeedLoss,
    Discriminative: SeedLoss, Adapter: SeedLoss, LoRA: SeedLoss, WeightTransfer: SeedLoss,
    L2SP: L2SPLoss,
    Distill: DistillLoss,
}


def vectorizable(strategy: Strategy, optimizer: Any = None, task: str = "classification") -> tuple[bool, str]:
    """Whether K seeds of a cell with ``strategy`` can train as one vectorised model, and why not.

    ``optimizer`` is the partial optimizer (or its class/name) when known. Exact classes only: a
    subclass may change the loss or freezing in ways the adapters here do not know.
    """
    name = type(strategy).__name__
    if type(strategy) not in TERMS:
        return False, f"strategy {name}: " + NOT_VECTORISABLE.get(name, "no vectorised adapter "
                                                                  "(transfer_lab.vectorized.terms.TERMS)")
    if task != "classification":
        return False, f"task={task}: the vectorised engine handles classification only"
    if isinstance(strategy, Distill) and (strategy.hints or strategy.attention):
        return False, "strategy distill with hints/attention: trainable regressors and feature hooks per seed"
    if strategy.callbacks():
        return False, f"strategy {name} adds Lightning callbacks, which see one model, not K"
    opt = getattr(optimizer, "func", optimizer)
    opt_name = opt if isinstance(opt, str) or opt is None else getattr(opt, "__name__", str(opt))
    if opt_name is not None and opt_name.rsplit(".", 1)[-1] not in ELEMENTWISE_OPTIMIZERS:
        return False, (f"optimizer {opt_name}: not known to act element-wise "
                       f"(known: {', '.join(ELEMENTWISE_OPTIMIZERS)})")
    return True, "ok"


def seed_loss(strategies: list[Strategy], models: list[nn.Module], template: nn.Module) -> SeedLoss:
    return TERMS[type(strategies[0])](strategies, models, template)
