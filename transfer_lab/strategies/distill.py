"""Knowledge distillation: a frozen source model teaches a target model of any architecture.

Loss (Hinton, Vinyals & Dean, 2015), with optional FitNets hints (Romero et al., 2015) and
attention transfer (Zagoruyko & Komodakis, 2017)::

    ce_weight · CE(z_s, y) + kd_weight · T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))
      + hint_weight · Σ MSE(r(f_s), f_t) + attention_weight · Σ mean((a(f_s) − a(f_t))²)

``T²`` keeps the soft-target gradients on the scale of the hard-target ones as ``T`` changes
(Hinton et al., sec. 2). Intermediate features are read with forward hooks
(``transfer_lab.hooks``) at module paths given in the config.

Where the extra parameters live: the teacher is *not* registered anywhere (no gradients, not
saved with the student, moved to the batch's device on first use). The hint regressors train:
``build`` creates them (their shapes come from one dry forward of both models) and ``modules()``
declares them, so ``TransferModule`` registers them (device, optimizer, checkpoints); the student
model itself stays a plain ``Classifier`` (its saved weights and parameter count are its own).

Both captures are cloned: a hooked leaf followed by an in-place ReLU (``backbone.fc1.0`` of
``mlp``) would otherwise hand over its post-ReLU values on one side only.

Teacher cost: with logits only (no hints/attention) and deterministic training batches (target
``augment=none``, in-memory loader), the teacher's output for an image never changes, so
``cache_teacher`` (default ``auto``) runs the teacher once over the training set at ``setup`` and
the training loader yields ``(x, y, teacher_logits)`` — one teacher forward per image per run
instead of per image per epoch. The logits are per-sample rows of ``PairedData``, picked by the
positions of the target's own ``BatchLoader`` (same seed, same per-epoch permutation), so cached
and uncached runs see the same batches.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from transfer_lab.data.datamodule import TransferDataModule
from transfer_lab.data.paired import PairedData
from transfer_lab.errors import ConfigError
from transfer_lab.hooks import FeatureCapture, capture_features
from transfer_lab.models.classifier import Classifier
from transfer_lab.strategies.base import Loss, Strategy, TaskLoss
from transfer_lab.strategies.common import freeze


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``, averaged over the batch."""
    t = float(temperature)
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean") * t * t


def attention_map(f: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention: channel-mean of f², resized, L2-normalised."""
    a = f.pow(2).mean(1, keepdim=True)
    if size is not None and tuple(a.shape[-2:]) != tuple(size):
        a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
    return F.normalize(a.flatten(1), dim=1)


def _pairs(value: Any, key: str) -> list[tuple[str, str]]:
    out = []
    for p in value or []:
        if len(p) != 2:
            raise ConfigError(f"strategy.{key}: each entry is [student_path, teacher_path]; got {p}")
        out.append((str(p[0]), str(p[1])))
    return out


class Distill(Strategy):
    """Train the target (student) on labels and on the frozen source model's (teacher's) outputs.

    Args:
        temperature: softmax temperature ``T`` of the KD term.
        ce_weight: weight of the hard-label cross-entropy.
        kd_weight: weight of the ``T²``-scaled KL term (0 disables the logit term).
        hints: FitNets pairs ``[[student_path, teacher_path], ...]``; a learned 1×1 conv (4-D
            features) or linear map (2-D) regresses the student feature onto the teacher's.
        hint_weight: weight of the summed hint MSEs.
        attention: attention-transfer pairs ``[[student_path, teacher_path], ...]`` (4-D features).
        attention_weight: β of attention transfer (1000 as in the authors' code).
        cache_teacher: ``auto`` (cache the teacher's logits once per training set when valid: KD
            term on, no hints/attention, target ``augment=none`` and no ``imbalance_remedy=augment``,
            ``loader=memory``), ``true`` (the same, but an invalid setting is an error) or ``false``.
    """

    def __init__(self, temperature: float = 4.0, ce_weight: float = 1.0, kd_weight: float = 1.0,
                 hints: list[list[str]] | None = None, hint_weight: float = 1.0,
                 attention: list[list[str]] | None = None, attention_weight: float = 1000.0,
                 cache_teacher: str | bool = "auto") -> None:
        super().__init__()
        if temperature <= 0:
            raise ConfigError(f"strategy.temperature={temperature}: must be > 0")
        if cache_teacher not in ("auto", True, False):
            raise ConfigError(f"strategy.cache_teacher={cache_teacher!r}: valid: auto, true, false")
        self.cache_teacher = cache_teacher
        self.cache_info: dict[str, Any] = {"used": False, "reason": "datamodule hook not called"}
        self.temperature, self.ce_weight, self.kd_weight = temperature, ce_weight, kd_weight
        self.hints, self.attention = _pairs(hints, "hints"), _pairs(attention, "attention")
        self.hint_weight, self.attention_weight = hint_weight, attention_weight
        self.teacher: Classifier | None = None
        self.regressors = nn.ModuleDict()
        self.stats: dict[str, torch.Tensor] | None = None

    # --- build: teacher, hooks, regressors ---------------------------------------------------
    def build(self, source: Classifier | None, target: Classifier) -> nn.Module:
        if source is None:
            raise ConfigError("strategy=distill needs a source model (the teacher)")
        if source.num_classes != target.num_classes:
            raise ConfigError(f"strategy=distill: the teacher predicts {source.num_classes} classes, "
                              f"the student {target.num_classes}; distil on the teacher's label space")
        self.teacher = copy.deepcopy(source)
        freeze(self.teacher)
        s_paths = [s for s, _ in self.hints + self.attention]
        t_paths = [t for _, t in self.hints + self.attention]
        self.s_capture = FeatureCapture(target, s_paths, clone=True,
                                        key="strategy.hints/attention (student)")
        self.t_capture = FeatureCapture(self.teacher, t_paths, clone=True,
                                        key="strategy.hints/attention (teacher)")
        fs = _dry_features(target, s_paths)
        ft = _dry_features(self.teacher, t_paths)
        for i, (s, t) in enumerate(self.hints):
            self.regressors[f"hint{i}"] = _regressor(fs[s], ft[t], s, t)
        for s, t in self.attention:
            if fs[s].ndim != 4 or ft[t].ndim != 4:
                raise ConfigError(f"strategy.attention: [{s}, {t}] must both be 4-D feature maps; got "
                                  f"{tuple(fs[s].shape[1:])} and {tuple(ft[t].shape[1:])}")
        self.param_counts = {"student": sum(p.numel() for p in target.parameters()),
                             "teacher": sum(p.numel() for p in self.teacher.parameters()),
                             "regressors": sum(p.numel() for p in self.regressors.parameters())}
        return target

    def datamodule(self, target_dm: L.LightningDataModule,
                   source_dm: L.LightningDataModule | None) -> L.LightningDataModule:
        """Record both normalisations so a target batch can be re-expressed for the teacher."""
        src = source_dm if source_dm is not None else target_dm  # a checkpoint source: assume alike
        self.stats = {"t_mean": target_dm.mean, "t_std": target_dm.std,
                      "s_mean": src.mean, "s_std": src.std}
        why_not = self._cache_blocker(target_dm)
        if why_not and self.cache_teacher is True:
            raise ConfigError(f"strategy.cache_teacher=true: cannot cache the teacher's logits ({why_not})")
        self.cache_info = {"used": not why_not and self.cache_teacher is not False,
                           "reason": why_not or ("off" if self.cache_teacher is False else "valid")}
        return PairedData(target_dm, per_sample=self.cache_logits) if self.cache_info["used"] else target_dm

    def _cache_blocker(self, dm: L.LightningDataModule) -> str | None:
        """Why the teacher's logits for an image can change between epochs (None: they cannot)."""
        if not self.kd_weight:
            return "kd_weight=0: the teacher is never run"
        if self.hints or self.attention:
            return "hints/attention need the teacher's features of every batch"
        if not isinstance(dm, TransferDataModule):
            return f"the target data module is a {type(dm).__name__}, not a TransferDataModule"
        if dm.loader != "memory":
            return f"target.data.loader={dm.loader} (needs memory)"
        if dm.augment != "none":
            return f"target.data.augment={dm.augment}: every epoch sees new crops"
        if dm.imbalance_remedy == "augment":
            return "target.data.imbalance_remedy=augment: minority images are cropped per draw"
        return None

    @torch.no_grad()
    def cache_logits(self, dm: TransferDataModule, trainer: L.Trainer) -> torch.Tensor:
        """The teacher's logits for every training image, transformed exactly as a training batch
        is (normalised, no augmentation), in eval-batch chunks on the training device."""
        t0 = time.perf_counter()
        device = trainer.strategy.root_device
        teacher = self.teacher.to(device).eval()
        out = []
        for chunk in dm.x_train.split(dm.eval_batch_size):
            x = dm.transform(chunk.to(device), train=True)
            with trainer.precision_plugin.forward_context():  # as the training step would run it
                out.append(teacher(self.teacher_input(x)).float())
        self.cache_info["seconds"] = round(time.perf_counter() - t0, 3)
        return torch.cat(out).to(dm.y_train.device)

    def modules(self) -> nn.ModuleDict:
        return nn.ModuleDict({"regressors": self.regressors})

    # --- training ---------------------------------------------------------------------------
    def teacher_input(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised target batch as the teacher expects it: un-normalise with the target
        statistics, convert channels (grey↔RGB) and size, re-normalise with the source's."""
        c, h, w = self.teacher.input_shape
        st = self.stats
        same_stats = st is None or (torch.equal(st["t_mean"], st["s_mean"])
                                    and torch.equal(st["t_std"], st["s_std"]))
        if tuple(x.shape[1:]) == (c, h, w) and same_stats:
            return x
        if st is None:
            raise ConfigError("strategy=distill: teacher and student inputs differ but the data "
                              "statistics are unknown (datamodule hook not called)")
        view = (1, -1, 1, 1)
        x = x * st["t_std"].to(x).view(view) + st["t_mean"].to(x).view(view)
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.repeat(1, c, 1, 1)
            elif c == 1 and x.shape[1] == 3:  # ITU-R 601 luma, as the data module converts
                x = (x * torch.tensor([0.299, 0.587, 0.114]).to(x).view(1, 3, 1, 1)).sum(1, True)
            else:
                raise ConfigError(f"strategy=distill: cannot feed {x.shape[1]}-channel batches to a "
                                  f"{c}-channel teacher")
        if tuple(x.shape[-2:]) != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return (x - st["s_mean"].to(x).view(view)) / st["s_std"].to(x).view(view)

    def loss(self, model: nn.Module, batch: Any, task_loss: TaskLoss) -> Loss:
        x, y, *cached = batch  # (x, y, teacher_logits) when the teacher's logits are cached
        t_logits = cached[0] if cached else None
        if (self.kd_weight and t_logits is None) or self.hints or self.attention:
            t_logits = self._teacher_forward(x)  # kd_weight=0 alone: no teacher forward
        with self.s_capture:
            logits = model(x)
        terms = {"ce": self.ce_weight * task_loss(logits, y)}
        if self.kd_weight:
            terms["kd"] = self.kd_weight * kd_loss(logits, t_logits, self.temperature)
        if self.hints:
            terms["hint"] = self.hint_weight * sum(self._hint(i, s, t) for i, (s, t) in enumerate(self.hints))
        if self.attention:
            terms["at"] = self.attention_weight * sum(self._attention(s, t) for s, t in self.attention)
        return Loss(terms, logits, y)

    @torch.no_grad()
    def _teacher_forward(self, x: torch.Tensor) -> torch.Tensor:
        teacher = self.teacher
        if next(teacher.parameters()).device != x.device:
            teacher.to(x.device)
        teacher.eval()  # Lightning's train() calls never reach it: it is not registered
        with self.t_capture:
            return teacher(self.teacher_input(x))

    def _hint(self, i: int, s: str, t: str) -> torch.Tensor:
        f_t = self.t_capture[t]
        f_s = self.regressors[f"hint{i}"](self.s_capture[s])
        if f_s.ndim == 4 and f_s.shape[-2:] != f_t.shape[-2:]:
            f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[-2:])
        return F.mse_loss(f_s, f_t)

    def _attention(self, s: str, t: str) -> torch.Tensor:
        f_t = self.t_capture[t]
        a_s = attention_map(self.s_capture[s], tuple(f_t.shape[-2:]))
        return (a_s - attention_map(f_t)).pow(2).mean()

    def report(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "ce_weight": self.ce_weight,
                "kd_weight": self.kd_weight, "hints": [list(p) for p in self.hints],
                "attention": [list(p) for p in self.attention],
                "cache_teacher": self.cache_teacher, "teacher_cache": self.cache_info,
                "params": getattr(self, "param_counts", None)}


@torch.no_grad()
def _dry_features(model: Classifier, paths: list[str]) -> dict[str, torch.Tensor]:
    """Feature shapes from one eval-mode forward of two zero images (no BN statistics move)."""
    if not paths:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        return capture_features(model, torch.zeros(2, *model.input_shape, device=device), paths)
    finally:
        model.train(was_training)


def _regressor(f_s: torch.Tensor, f_t: torch.Tensor, s: str, t: str) -> nn.Module:
    if f_s.ndim == 4 and f_t.ndim == 4:
        return nn.Conv2d(f_s.shape[1], f_t.shape[1], 1)
    if f_s.ndim == 2 and f_t.ndim == 2:
        return nn.Linear(f_s.shape[1], f_t.shape[1])
    raise ConfigError(f"strategy.hints: [{s}, {t}] pairs a {tuple(f_s.shape[1:])} student feature "
                      f"with a {tuple(f_t.shape[1:])} teacher feature; both must be 4-D maps or "
                      "2-D vectors")
