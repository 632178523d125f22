"""``hydra/launcher=vectorized``: Hydra's basic launcher, but cells that differ only in ``seed``
are first trained together as one vectorised model.

Each group's cells get their ``results.json`` in the directories Hydra gives them; then the
ordinary loop runs every cell through ``run_job`` — a finished cell is skipped by
``transfer_lab.results.completed`` — so ``.hydra/`` files, logs, return values and resuming stay
Hydra's and the entry point's. A group that cannot be vectorised (strategy, devices, unequal data,
``vectorize_seeds=false``) or fails trains nothing here: its cells run one at a time as always.
"""

# no ``from __future__ import annotations``: Hydra execs plugin modules outside sys.modules,
# where dataclasses cannot resolve string annotations

import copy
import dataclasses
import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger("transfer_lab")


class VectorizedLauncher(BasicLauncher):
    """Its config is ``conf/hydra/launcher/vectorized.yaml`` (``min_group``: fewest seeds grouped)."""

    def __init__(self, min_group: int = 2) -> None:
        super().__init__()
        self.min_group = min_group
        self._composed: dict = {}  # job overrides → the sweep config composed for them (launch only)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from transfer_lab.sweep import record_cell

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        trained, self._composed = [], {}
        for members in group_jobs(job_overrides, initial_job_idx).values():
            if len(members) >= self.min_group:
                trained += self._train_group(members)
        # the job loop reuses the configs composed above (composing is most of a skipped cell's time)
        context = self.hydra_context
        self.hydra_context = dataclasses.replace(context, config_loader=_Composed(context.config_loader,
                                                                                 self._composed))
        try:
            returns = super().launch(job_overrides, initial_job_idx)
        finally:
            self.hydra_context, self._composed = context, {}
        for idx, out_dir in trained:  # the job loop found them done: this launch trained them
            record_cell(self.config.hydra.sweep.dir, idx, "ok", out_dir)
        return returns

    def cell(self, idx: int, overrides: list[str]) -> "tuple[DictConfig, str, dict]":
        """A job's task config, output directory and choices, as ``run_job`` would make them."""
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        self._composed[tuple(overrides)] = copy.deepcopy(sweep_config)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(sweep_config)
        try:
            hc = sweep_config.hydra
            out_dir = str(Path(str(hc.sweep.dir)) / str(hc.sweep.subdir))
            choices = {k: v for k, v in OmegaConf.to_container(hc.runtime.choices).items()
                       if not k.startswith("hydra/")}
        finally:
            if saved is not None:
                HydraConfig.instance().cfg = saved
        task_cfg = copy.deepcopy(sweep_config)
        with read_write(task_cfg), open_dict(task_cfg):
            del task_cfg["hydra"]
        return task_cfg, out_dir, choices

    def _train_group(self, members: list[tuple[int, list[str]]]) -> "list[tuple[int, str]]":
        """Train the unfinished cells of one group together; returns ``(job index, output dir)``
        of each cell it wrote (none when the group runs one cell at a time)."""
        from transfer_lab.results import completed
        from transfer_lab.vectorized.group import cheap_check, group_key, run_group

        cells = []
        for idx, overrides in members:
            cfg, out_dir, choices = self.cell(idx, overrides)
            if completed(cfg, out_dir) is not None:
                continue
            ok, why = cheap_check(cfg)
            if not ok:
                log.info("jobs %s run one at a time: %s", [m[0] for m in members], why)
                return []
            cells.append((idx, cfg, out_dir, choices))
        if len(cells) < self.min_group:
            return []
        key = hashlib.sha1(" ".join(group_key(members[0][1])).encode()).hexdigest()[:12]
        group_dir = Path(str(self.config.hydra.sweep.dir)) / ".vectorized" / key
        log.info("training seeds %s as one vectorised model", [int(c[1].seed) for c in cells])
        try:
            done = run_group([c[1] for c in cells], [c[2] for c in cells], [c[3] for c in cells], group_dir)
        except Exception as e:  # noqa: BLE001 — the cells then run (and fail, if they must) alone
            log.warning("vectorised group failed (%s: %s); its cells run one at a time",
                        type(e).__name__, e)
            return []
        return [(c[0], c[2]) for c in cells] if done is not None else []


class _Composed:
    """A config loader that hands out each already composed sweep config once (then composes)."""

    def __init__(self, loader, composed: dict) -> None:
        self._loader, self._composed = loader, composed

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list) -> DictConfig:
        done = self._composed.pop(tuple(sweep_overrides), None)
        return done if done is not None else self._loader.load_sweep_config(master_config, sweep_overrides)

    def __getattr__(self, name: str):
        return getattr(self._loader, name)


def group_jobs(job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> dict:
    """``{overrides but seed: [(job index, overrides), ...]}`` in sweep order."""
    from transfer_lab.vectorized.group import group_key

    groups: dict[tuple, list] = defaultdict(list)
    for i, ov in enumerate(job_overrides):
        groups[group_key(list(ov))].append((initial_job_idx + i, list(ov)))
    return groups
