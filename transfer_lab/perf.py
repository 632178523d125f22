"""Performance options as Lightning callbacks, chosen in the trainer config.

``conf/trainer/*.yaml`` has ``callbacks: [...]``; ``run.make_trainer`` instantiates each
``_target_`` there and passes it to the Trainer beside the strategy's own callbacks::

    callbacks:
      - _target_: transfer_lab.perf.ChannelsLast
      - _target_: transfer_lab.perf.Compile
        mode: max-autotune-no-cudagraphs

Mixed precision needs no callback: it is the Trainer's own ``precision`` key
(``32-true``, ``bf16-mixed``, ``16-mixed``).

Both options pay off on GPUs (channels_last feeds tensor cores without layout transposes;
compile fuses the many small element-wise kernels of small models) and are off by default
because on this project's 2-core CPU they do not (see experiments/benchmarks/README.md).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

log = logging.getLogger("transfer_lab")


def _channels_last_input(module: nn.Module, args: tuple) -> tuple:
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return args


class ChannelsLast(Callback):
    """Keep 4-D weights and 4-D model inputs in ``channels_last`` (NHWC) memory format.

    The weights are converted in place (same ``Parameter`` objects, so optimizers and
    strategies holding them still see them); inputs are converted by a forward pre-hook on
    ``pl_module.model``, so every data module and strategy gets it without code changes.
    Numerics are those of the default layout up to float rounding.
    """

    def __init__(self) -> None:
        self._handle: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        pl_module.to(memory_format=torch.channels_last)
        if self._handle is None:
            self._handle = model_of(pl_module).register_forward_pre_hook(_channels_last_input)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # the model outlives the Trainer (saved, reused by the next stage): leave no hook behind
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class Compile(Callback):
    """``torch.compile`` the model in place (``nn.Module.compile``) before training.

    In-place compilation keeps parameter names (no ``_orig_mod.`` prefix), so checkpoints,
    the source store and forward hooks keyed by module path work unchanged.

    Args:
        mode: ``torch.compile`` mode (``default``, ``reduce-overhead``, ``max-autotune``, ...).
        backend: compiler backend; ``inductor`` generates kernels, ``eager`` only traces (tests).
        dynamic: passed to ``torch.compile`` (None: recompile once, then go dynamic).
        fullgraph: fail on graph breaks instead of falling back to Python.
    """

    def __init__(self, mode: str | None = None, backend: str = "inductor", dynamic: bool | None = None,
                 fullgraph: bool = False) -> None:
        self.mode, self.backend, self.dynamic, self.fullgraph = mode, backend, dynamic, fullgraph
        self._done: set[int] = set()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        model = model_of(pl_module)
        if id(model) in self._done:
            return
        model.compile(mode=self.mode, backend=self.backend, dynamic=self.dynamic,
                      fullgraph=self.fullgraph)
        self._done.add(id(model))
        log.info("torch.compile(mode=%s, backend=%s) on %s", self.mode, self.backend,
                 type(model).__name__)


@functools.cache
def _nvml_loadable() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


def skip_nvml_check_without_driver() -> bool:
    """Turn off Lightning's NVML-based CUDA check where NVML cannot exist (no NVIDIA driver).

    ``import lightning`` sets ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` so that asking whether CUDA is
    available does not initialise CUDA before DDP forks. Without a driver torch then tries
    ``dlopen("libnvidia-ml.so.1")`` on *every* ``torch.cuda.is_available()`` call — which
    ``torch.optim.Adam.step`` makes on every step — fails, and falls back to the runtime count
    anyway: ~0.1–0.3 ms a step on a CUDA build of torch without a GPU. Where the library cannot be
    loaded the two checks give the same answer (0 devices, no CUDA context to poison), so the
    runtime one is used. Returns whether the variable was changed.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1" or not torch.backends.cuda.is_built():
        return False
    if _nvml_loadable():
        return False
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "0"
    return True


def model_of(pl_module: L.LightningModule) -> nn.Module:
    """The network a module trains: ``pl_module.model`` (TransferModule), else the module itself."""
    model = getattr(pl_module, "model", None)
    return model if isinstance(model, nn.Module) else pl_module
