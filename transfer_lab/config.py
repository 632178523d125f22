"""The schema of the run's own keys: typed dataclasses in Hydra's ConfigStore.

``conf/train.yaml`` starts from ``run_schema`` (its first default), so a wrong type or an
unknown key of the run itself (``seed=abc``, ``target.save_weights=al``, ``target.epoch=3``)
fails when Hydra composes, naming the key and, for choices, the valid values. The leaves
(data, model, optimizer, strategy, trainer, logger, callbacks) stay ``Any``: each is checked
against its own constructor (``validate.check_leaf``) and built by ``builders``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


class SaveWeights(str, Enum):
    """What of the target is written: ``auto`` = only what trained when anything is frozen."""

    auto = "auto"
    trainable = "trainable"
    full = "full"
    none = "none"


@dataclass
class Stage:
    """Keys both stages share; ``data``/``model``/``optimizer`` are config-group leaves."""

    epochs: int = 3
    steps: Optional[int] = None  # total optimizer steps; replaces epochs when set
    val_check_interval: Any = None  # validate every N steps (int) or fraction of an epoch
    scheduler: Any = None  # learning-rate schedule: a conf/scheduler/ config (scheduler@<stage>.scheduler=...)
    trainer: Any = field(default_factory=dict)  # extra Trainer kwargs for this stage only
    data: Any = None
    model: Any = None
    optimizer: Any = None


class VectorizeMode(str, Enum):
    """How a group of seeds runs (``transfer_lab.vectorized.modes``)."""

    auto = "auto"
    vmap = "vmap"
    loop = "loop"


class Select(str, Enum):
    """Which target weights are tested: the last ones, or the best-validation checkpoint."""

    last = "last"
    best_val = "best_val"


@dataclass
class Convergence:
    """Tolerances of the convergence check (``transfer_lab.convergence``)."""

    val_tol: float = 0.01  # best validation metric improved less than this over the last fifth
    loss_tol: float = 0.05  # share of the training loss's fall allowed in the last fifth
    min_evals: int = 3  # fewer validations: not converged


@dataclass
class SourceStage(Stage):
    checkpoint: Optional[str] = None  # a knowledge package, .safetensors or weights-only checkpoint
    wait_timeout_s: float = 24 * 3600.0  # DDP ranks ≠ 0: how long to wait for rank 0's store entry


@dataclass
class TargetStage(Stage):
    epochs: int = 30
    save_weights: SaveWeights = SaveWeights.auto
    select: Select = Select.last
    monitor: Optional[str] = None  # null: val/acc (max) for classification, val/loss (min) for regression
    early_stopping: Any = None  # {patience, min_delta} or null
    convergence: Convergence = field(default_factory=Convergence)


@dataclass
class RunConfig:
    seed: int = 0
    store_dir: str = "store"
    data_dir: str = "data"  # conf/train.yaml: $TRANSFER_LAB_DATA, else data/ inside the repository
    resume: bool = True
    transferability: bool = True
    optimized_metric: Optional[str] = None
    vectorize_mode: VectorizeMode = VectorizeMode.auto  # auto | vmap | loop: how a group runs its K seeds (vectorized/modes.py)
    vectorize_seeds: bool = True  # hydra/launcher=vectorized groups a sweep's seeds (transfer_lab/vectorized/)
    source: SourceStage = field(default_factory=SourceStage)
    target: TargetStage = field(default_factory=TargetStage)
    strategy: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None


def cell_dirname(num: Any, overrides: str, limit: int = 200) -> str:
    """A sweep cell's directory name (``hydra.sweep.subdir``): ``<job num>_<overrides>``, as Hydra's
    ``override_dirname``; a name longer than ``limit`` bytes (a file name may hold 255) keeps its
    first bytes and ends with a hash of all the overrides, so distinct cells stay distinct and a
    re-run finds its directory again. An empty ``num`` (``${tl_cell_dir:'',...}``) names the cell by
    its overrides alone, so an extended sweep finds its finished cells whatever their job number."""
    name = f"{num}_{overrides}" if num not in (None, "") else overrides
    if len(name.encode()) <= limit:
        return name
    digest = hashlib.sha1(overrides.encode()).hexdigest()[:12]
    return f"{name.encode()[:limit - 13].decode(errors='ignore')}~{digest}"


def register() -> None:
    """Store the schema as ``run_schema`` (idempotent: ConfigStore replaces an entry) and the
    ``tl_cell_dir`` resolver ``conf/train.yaml``'s sweep subdir uses."""
    ConfigStore.instance().store(name="run_schema", node=RunConfig)
    OmegaConf.register_new_resolver("tl_cell_dir", cell_dirname, replace=True)
