"""VectorizedModule: K seeds of one cell trained as one LightningModule (``torch.func`` ensembling).

One Lightning step takes the K seeds' batches stacked (K×B×…) and runs every seed's model at
once with ``functional_call`` under ``vmap``. The loss is the *sum* of the seeds' losses, so the
gradient of seed k's slice is exactly its separate run's gradient; with an element-wise optimizer
(Adam, AdamW, SGD, …) the K slices then train exactly as K separate runs would.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from transfer_lab.module import NonFiniteLossError, add_row
from transfer_lab.schedulers import ScheduleFactory, configure_scheduler
from transfer_lab.strategies.base import Strategy
from transfer_lab.strategies.common import hold_frozen_in_eval
from transfer_lab.vectorized.data import NotVectorisable
from transfer_lab.vectorized.modes import (backward_per_seed, check_mode, loop_seeds, resolve_mode,
                                           unbind_all, vmap_cross_entropy)
from transfer_lab.vectorized.stack import Bag, Stacked
from transfer_lab.vectorized.terms import seed_loss


class VectorizedModule(L.LightningModule):
    """K built models of one architecture (``strategies[k].build(source_k, target_k)``), trained as one.

    Args:
        models: the K built target models; ``unstack()`` writes the trained weights back.
        strategies: the K strategy instances that built them (their state: references, teachers).
        optimizer: a partial optimizer taking param groups (element-wise: see ``vectorizable``).
        lr: base learning rate; the strategy derives group rates from it.
        num_classes: classes of the target task.
        class_weights: per-seed class weights (``imbalance_remedy=reweight``) or None.
        scheduler: a schedule factory or None, as ``TransferModule``; mode: auto | vmap | loop (modes.py).
    """

    def __init__(self, models: list[nn.Module], strategies: list[Strategy],
                 optimizer: Callable[..., torch.optim.Optimizer], lr: float, num_classes: int,
                 class_weights: list[torch.Tensor | None] | None = None,
                 scheduler: ScheduleFactory | None = None, mode: str = "auto") -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["models", "strategies", "optimizer", "class_weights", "scheduler"])
        self.k = len(models)
        self.models, self.strategies, self.optimizer_factory = models, strategies, optimizer
        self.scheduler_factory = scheduler
        self._template = [copy.deepcopy(models[0])]  # a list: not a submodule, its tensors are never used
        self.stacked = Stacked(models)
        self.seed_loss = seed_loss(strategies, models, self.template)
        self.aux = Bag(self.seed_loss.aux())
        cws = class_weights or [None] * self.k
        self.register_buffer("class_weights", None if cws[0] is None else torch.stack(cws), persistent=False)
        # dropout/augmentation-like draws: each seed its own (not the separate run's exact draws)
        self._seed_step = vmap(self._one_seed, in_dims=(0, 0, None if cws[0] is None else 0, 0),
                               randomness="different")
        self.mode = check_mode(mode)  # "vmap" or "loop" once the device is known (modes.py)
        self._run: str | None = None
        self._train_sums: torch.Tensor | None = None  # (correct, loss, terms…) × K, on the device
        self._train_count, self._term_names = 0, []
        self.seed_metrics: list[dict[str, float]] = [{} for _ in range(self.k)]
        self.test_per_class: list[list[float] | None] = [None] * self.k
        # per seed, (step, val/acc, train loss) at every validation: the convergence check's input
        self.history: list[list[tuple[int, float, float | None]]] = [[] for _ in range(self.k)]
        self._sums: dict[str, torch.Tensor] = {}

    @property
    def template(self) -> nn.Module:
        return self._template[0]

    def train(self, mode: bool = True) -> VectorizedModule:
        """The template follows; fully frozen parts stay in eval (``hold_frozen_in_eval``, as
        ``TransferModule.train``), so a frozen backbone's statistics do not drift."""
        super().train(mode)
        if hasattr(self, "_template"):
            self.template.train(mode)
            if mode:
                hold_frozen_in_eval(self.template, self.strategies[0].train_bn)
        return self

    # --- training ---------------------------------------------------------------------------
    def _one_seed(self, params, aux, class_weights, batch):
        def task_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if self._run == "loop":
                return F.cross_entropy(outputs, y, weight=class_weights)
            return vmap_cross_entropy(outputs, y, class_weights)

        step = self.seed_loss.loss(params, aux, batch, task_loss)
        # summed as TransferModule sums them (same order, same start), so the slice is exact
        return sum(step.terms.values()), step.outputs, step.target, step.terms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """K×B×… inputs → K×B×classes logits (seed k's model on slice k)."""
        if self._mode() == "loop":
            return torch.stack([functional_call(self.template, p, (xk,))
                                for p, xk in zip(unbind_all(self.stacked.tensors(), self.k), x.unbind(0))])
        return vmap(lambda p, xk: functional_call(self.template, p, (xk,)),
                    randomness="different")(self.stacked.tensors(), x)

    def _mode(self) -> str:
        """``vmap`` or ``loop`` on this module's device (``mode``; ``auto``: see ``modes.py``)."""
        if self._run is None:
            self._run = resolve_mode(self.mode, self.template, self.device, self.k)
            self.seed_loss.per_seed = self._run == "loop"
        return self._run

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if not self.template.training:
            for n, m in self.template.named_modules():
                m.training = self._modes[n]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        aux = self.aux.tensors()
        batch = (x, y, *self.seed_loss.extra(x, aux))
        args = (self.stacked.tensors(), aux, self.class_weights, batch)
        if self._mode() == "loop":  # seed by seed, each seed's backward right after its forward
            per_seed = backward_per_seed(self._trainer, self.stacked.trainable)
            losses, outputs, target, terms, total = loop_seeds(self._one_seed, self.k, *args, per_seed)
        else:
            losses, outputs, target, terms = self._seed_step(*args)
            total = losses.sum()
        n = target.shape[1]
        with torch.no_grad():  # per-seed epoch sums on the device, one add a step: no host sync
            correct = (outputs.argmax(-1) == target).sum(1)
            row = torch.stack([correct.to(losses.dtype), losses * n, *(v * n for v in terms.values())])
            self._train_sums, self._term_names = add_row(self._train_sums, self._term_names,
                                                         row.double(), ["correct", "loss", *(f"term:{t}" for t in terms)])
            self._train_count += n
        return total

    def train_loss_sum(self) -> torch.Tensor | None:
        """Per seed, Σ step loss × batch size so far this epoch, on the device (``SeedCurves``)."""
        return None if self._train_sums is None else self._train_sums[self._term_names.index("loss")]

    def _add(self, name: str, value: torch.Tensor) -> None:
        acc = self._sums.get(name)
        self._sums[name] = value.detach().double() if acc is None else acc + value.detach()

    def on_train_epoch_start(self) -> None:
        # Lightning 2.6 never calls ``train()`` in fit (as TransferModule); the template is not a
        # submodule, so validation does not restore its modes: kept here, restored per batch
        self.train()
        self._modes = {n: m.training for n, m in self.template.named_modules()}
        self._sums, self._train_sums, self._train_count, self._term_names = {}, None, 0, []
        loader = self.trainer.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        if self._train_sums is None:
            return
        rows = dict(zip(self._term_names, self._train_sums.cpu()))  # the epoch's one host sync
        count = float(self._train_count)
        bad = [k for k in range(self.k) if not math.isfinite(float(rows["loss"][k]))]
        if bad:
            raise NonFiniteLossError(f"non-finite training loss for seed(s) #{bad} of the vectorised "
                                     f"group in epoch {self.current_epoch}: train them one at a time")
        loss = rows["loss"] / count
        means = {"train/acc": rows.pop("correct") / count, "train/loss": loss,
                 **{f"train/{name[5:]}": v / count for name, v in rows.items() if name != "loss"}}
        for k, hist in enumerate(self.history):
            self.history[k] = [(st, v, float(loss[k]) if ls is None else ls) for st, v, ls in hist]
        self._publish(means)

    def _publish(self, means: dict[str, torch.Tensor]) -> None:
        """Per-seed epoch figures into ``seed_metrics`` and, as ``seed<k>/<key>``, to the loggers
        in one ``log_metrics`` call: ``self.log`` costs ~2 ms a key on this CPU (Lightning's
        ``_ResultMetric.to`` walk), K seeds × keys of them a large share of a small model's epoch."""
        flat = {}
        for key, values in means.items():
            for k, v in enumerate(values.tolist()):
                self.seed_metrics[k][key] = v
                flat[f"seed{k}/{key}"] = v
        for logger in self.loggers:
            logger.log_metrics({**flat, "epoch": self.current_epoch}, step=self.global_step)

    def _record(self, key: str, values: torch.Tensor) -> None:
        for k in range(self.k):
            self.seed_metrics[k][key] = float(values[k])
            self.log(f"seed{k}/{key}", float(values[k]))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer,
                                    gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Per seed: each slice is clipped by its own gradient norm, as its separate run would be."""
        if not gradient_clip_val:
            return
        grads = [p.grad for p in self.stacked.parameters() if p.grad is not None]
        if gradient_clip_algorithm == "value":  # element-wise already
            for g in grads:
                g.clamp_(-gradient_clip_val, gradient_clip_val)
            return
        norms = torch.stack([g.reshape(self.k, -1).pow(2).sum(1) for g in grads]).sum(0).sqrt()
        coef = (gradient_clip_val / (norms + 1e-6)).clamp(max=1.0)  # torch's clip_grad_norm_
        for g in grads:
            g.mul_(coef.view(-1, *[1] * (g.ndim - 1)).to(g.dtype))

    def configure_optimizers(self):
        lr = self.hparams.lr
        ref = [s.param_groups(m, lr) for s, m in zip(self.strategies, self.models)][0]
        name_of = {id(p): n for n, p in self.models[0].named_parameters()}
        groups, covered = [], set()
        for g in ref:
            names = [name_of[id(p)] for p in g["params"]]
            covered.update(names)
            groups.append({**g, "params": [self.stacked.param(n) for n in names]})
        missing = set(self.stacked.trainable) - covered
        if missing:
            raise NotVectorisable(f"trainable parameters outside the strategy's groups: {sorted(missing)[:3]}")
        opt = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return opt
        return configure_scheduler(self.scheduler_factory, opt, self.trainer)

    # --- evaluation: dataloader k is seed k -------------------------------------------------
    def _eval_step(self, batch: Any, k: int) -> None:
        x, y = batch
        if self.template.training:
            self.template.eval()
        out = functional_call(self.template, self.stacked.seed(k), (x,))
        c = out.shape[-1]
        conf = torch.bincount(y * c + out.argmax(-1), minlength=c * c).view(c, c)
        self._add(f"loss{k}", F.cross_entropy(out, y).detach().double().view(1) * len(y))
        self._add(f"confusion{k}", conf)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = self._sums  # validation runs inside a training epoch: keep its sums
        self._sums = {}

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._finish_eval("val")
        self._sums = self._eval_sums

    def on_test_epoch_start(self) -> None:
        self._sums = {}

    def on_test_epoch_end(self) -> None:
        self._finish_eval("test")

    def _finish_eval(self, stage: str) -> None:
        loss, acc, balanced = [], [], []
        for k in range(self.k):
            cm = self._sums[f"confusion{k}"].double().cpu()
            n = cm.sum()
            loss.append(float(self._sums[f"loss{k}"][0]) / max(1.0, float(n)))
            acc.append(float(cm.diag().sum() / n.clamp_min(1)))
            support = cm.sum(1)
            recall = cm.diag() / support.clamp_min(1)
            present = support > 0
            balanced.append(float(recall[present].mean()) if present.any() else float("nan"))
            if stage == "test":
                self.test_per_class[k] = [float(r) if p else float("nan")
                                          for r, p in zip(recall.tolist(), present.tolist())]
        self._record(f"{stage}/loss", torch.tensor(loss))
        self._record(f"{stage}/acc", torch.tensor(acc))
        if stage == "val" and not self.trainer.sanity_checking:
            for k in range(self.k):
                self.history[k].append((int(self.global_step), acc[k], None))
        if stage == "test":
            self._record("test/balanced_acc", torch.tensor(balanced))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # a resumed group judges each seed's whole curve (as ConvergenceCheck's state does)
        checkpoint["seed_history"] = [[list(h) for h in hist] for hist in self.history]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "seed_history" in checkpoint:
            self.history = [[tuple(h) for h in hist] for hist in checkpoint["seed_history"]]

    def unstack(self) -> list[nn.Module]:
        """Write each seed's trained tensors back into its model; returns the K models."""
        self.stacked.unstack_into(self.models)
        return self.models
