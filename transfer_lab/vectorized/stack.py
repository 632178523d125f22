"""K models of one architecture as one set of K-stacked tensors (``torch.func.stack_module_state``).

Trainable tensors become ``nn.Parameter``s of shape ``K×…`` on a holder module; frozen parameters
and buffers (BatchNorm statistics) become buffers of the same shape, so Lightning moves, saves
and optimises them like any module state. Names carry ``.`` (module paths), which
``register_parameter`` refuses, hence the ``-`` spelling on the holder.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import stack_module_state

from transfer_lab.errors import ConfigError


def _mangle(name: str) -> str:
    return name.replace(".", "-")


def check_alike(models: list[nn.Module]) -> None:
    """Same names, shapes, dtypes and frozen pattern in every model (else they cannot be stacked)."""
    ref = {n: (tuple(t.shape), t.dtype, t.requires_grad) for n, t in _state(models[0]).items()}
    for k, m in enumerate(models[1:], start=1):
        got = {n: (tuple(t.shape), t.dtype, t.requires_grad) for n, t in _state(m).items()}
        if got != ref:
            diff = sorted(set(got.items()) ^ set(ref.items()))[:1]
            raise ConfigError(f"vectorize_seeds: seed #{k}'s model differs from seed #0's "
                              f"({diff}); train these cells one at a time (vectorize_seeds=false)")


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(m.named_parameters()), **dict(m.named_buffers())}


class Stacked(nn.Module):
    """The K-stacked parameters (trainable: ``nn.Parameter``) and buffers of ``models``."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        check_alike(models)
        params, buffers = stack_module_state(models)
        self.trainable = [n for n, p in models[0].named_parameters() if p.requires_grad]
        self.names = [*params, *buffers]
        for n, t in params.items():
            if n in self.trainable:
                self.register_parameter(_mangle(n), nn.Parameter(t.detach().clone()))
            else:
                self.register_buffer(_mangle(n), t.detach().clone())
        for n, t in buffers.items():
            self.register_buffer(_mangle(n), t.clone())

    @property
    def k(self) -> int:
        return len(getattr(self, _mangle(self.names[0])))

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{model path: K×… tensor}``, what ``functional_call`` under ``vmap`` takes."""
        return {n: getattr(self, _mangle(n)) for n in self.names}

    def param(self, name: str) -> torch.Tensor:
        return getattr(self, _mangle(name))

    def seed(self, k: int) -> dict[str, torch.Tensor]:
        """Seed ``k``'s tensors (views)."""
        return {n: t[k] for n, t in self.tensors().items()}

    @torch.no_grad()
    def unstack_into(self, models: list[nn.Module]) -> None:
        """Copy seed ``k``'s trained tensors back into ``models[k]`` (in place: objects that hold
        the model, e.g. a strategy's report, see the trained weights)."""
        for k, m in enumerate(models):
            state = _state(m)
            for n, t in self.seed(k).items():
                state[n].copy_(t.to(state[n].device))


class Bag(nn.Module):
    """K-stacked constant tensors (teachers, reference weights) as buffers: moved with the module."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.names = list(tensors)
        for n, t in tensors.items():
            self.register_buffer(_mangle(n), t.detach().clone(), persistent=False)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, _mangle(n)) for n in self.names}
