"""Which strategies train as K stacked seeds, and their loss terms for one seed inside ``vmap``.

This is the adapter surface between the vectorised engine and the strategies: a strategy's
freezing and param groups are read from the built models and ``param_groups`` as they are; what
its ``training_loss`` adds beside the task loss is written here once more as a pure function of
one seed's tensors (``SeedTerms``), because ``vmap`` runs on tensors, not on modules.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from transfer_lab.strategies.adapter import Adapter
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.discriminative import Discriminative
from transfer_lab.strategies.distill import Distill, kd_loss
from transfer_lab.strategies.finetune import Finetune
from transfer_lab.strategies.l2sp import L2SP
from transfer_lab.strategies.linear_probe import LinearProbe
from transfer_lab.strategies.lora import LoRA
from transfer_lab.strategies.partial import Partial
from transfer_lab.strategies.scratch import Scratch
from transfer_lab.strategies.weight_transfer import WeightTransfer

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


class SeedTerms:
    """The task loss alone (scratch, finetune, linear_probe, partial, discriminative, adapter, lora,
    weight_transfer: strategies that only build, freeze and group).

    Override ``aux`` to give K-stacked tensors a seed's terms need, and ``terms`` to compute the
    named terms of one seed from its parameters (inside ``vmap``: no batch-of-K dimension).
    """

    #: terms logged per seed as ``train/<name>`` (as the strategy's own training step logs them)
    logged: tuple[str, ...] = ()

    def __init__(self, strategies: list[Strategy], models: list[nn.Module]) -> None:
        self.strategies = strategies

    def aux(self) -> dict[str, torch.Tensor]:
        return {}

    def weights(self) -> dict[str, float]:
        """Name → weight of each term in the training loss (absent: logged only)."""
        return {"task": 1.0}

    def terms(self, params: dict[str, torch.Tensor], aux: dict[str, torch.Tensor],
              x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
              class_weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"task": F.cross_entropy(logits, y, weight=class_weights)}


class L2SPTerms(SeedTerms):
    """Task loss + ``alpha/2·‖w − w_src‖²`` (each seed's own source) + ``beta/2·‖w‖²`` (the rest)."""

    def __init__(self, strategies: list[Strategy], models: list[nn.Module]) -> None:
        super().__init__(strategies, models)
        s = strategies[0]
        self.alpha, self.beta = s.alpha, s.beta
        self.trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
        self.refs = {n: torch.stack([st.reference[n] for st in strategies])
                     for n in self.trainable if n in s.reference}

    def aux(self) -> dict[str, torch.Tensor]:
        return {f"ref:{n}": t for n, t in self.refs.items()}

    def weights(self) -> dict[str, float]:
        return {"task": 1.0, "penalty": 1.0}

    def terms(self, params, aux, x, y, logits, class_weights):
        pull = sum((params[n] - aux[f"ref:{n}"]).pow(2).sum() for n in self.refs)
        new = sum(params[n].pow(2).sum() for n in self.trainable if n not in self.refs)
        return {"task": F.cross_entropy(logits, y, weight=class_weights),
                "penalty": 0.5 * self.alpha * pull + 0.5 * self.beta * new}


class DistillTerms(SeedTerms):
    """``ce_weight·CE + kd_weight·T²·KL`` against each seed's own frozen teacher (stacked, vmapped)."""

    def __init__(self, strategies: list[Strategy], models: list[nn.Module]) -> None:
        super().__init__(strategies, models)
        self.s = strategies[0]
        self.logged = ("ce", "kd") if self.s.kd_weight else ("ce",)
        self.teacher = copy.deepcopy(self.s.teacher).eval()
        states = [{**dict(st.teacher.named_parameters()), **dict(st.teacher.named_buffers())}
                  for st in strategies]
        self.stacked = {n: torch.stack([s[n].detach() for s in states]) for n in states[0]}

    def aux(self) -> dict[str, torch.Tensor]:
        return {f"teacher:{n}": t for n, t in self.stacked.items()}

    def weights(self) -> dict[str, float]:
        return {"ce": self.s.ce_weight, "kd": self.s.kd_weight} if self.s.kd_weight else {"ce": self.s.ce_weight}

    def terms(self, params, aux, x, y, logits, class_weights):
        out = {"ce": F.cross_entropy(logits, y, weight=class_weights)}
        if self.s.kd_weight:
            teacher = {n[len("teacher:"):]: t for n, t in aux.items() if n.startswith("teacher:")}
            with torch.no_grad():
                t_logits = functional_call(self.teacher, teacher, (self.s.teacher_input(x),))
            out["kd"] = kd_loss(logits, t_logits, self.s.temperature)
        return out


TERMS: dict[type, type[SeedTerms]] = {
    Scratch: SeedTerms, Finetune: SeedTerms, LinearProbe: SeedTerms, Partial: SeedTerms,
    Discriminative: SeedTerms, Adapter: SeedTerms, LoRA: SeedTerms, WeightTransfer: SeedTerms,
    L2SP: L2SPTerms,
    Distill: DistillTerms,
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


def seed_terms(strategies: list[Strategy], models: list[nn.Module]) -> SeedTerms:
    return TERMS[type(strategies[0])](strategies, models)
