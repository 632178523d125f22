"""A sweep that survives a bad cell: each cell leaves its status, the sweep ends with a summary.

Every cell (in whichever process a launcher runs it: in-process, joblib worker, SLURM job) writes
``<sweep dir>/.cells/<job num>.json``; ``SweepSummary`` (a Hydra callback registered in
``conf/train.yaml``) clears them when the sweep starts and, when it ends, prints
``sweep: N ok, M failed, K skipped`` with each failed cell's line and exits 1 if any failed.
Kept free of torch/Lightning: Hydra instantiates callbacks before every run, single ones too.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

CELLS = ".cells"


def record_cell(sweep_dir: str | Path, job_num: int, status: str, out_dir: str | Path,
                error: str | None = None) -> None:
    """One cell's outcome (``ok``, ``failed`` or ``skipped``) for the sweep's summary."""
    from transfer_lab.io import atomic_write_json

    d = Path(sweep_dir) / CELLS
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_json(d / f"{int(job_num)}.json", {"status": status, "dir": str(out_dir), "error": error})


def read_cells(sweep_dir: str | Path) -> list[dict[str, Any]]:
    cells = []
    for p in sorted((Path(sweep_dir) / CELLS).glob("*.json"), key=lambda p: int(p.stem)):
        try:
            cells.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            cells.append({"status": "failed", "dir": str(p), "error": "cell status unreadable"})
    return cells


def summary_line(cells: list[dict[str, Any]]) -> str:
    n = {s: sum(c["status"] == s for c in cells) for s in ("ok", "failed", "skipped")}
    return f"sweep: {n['ok']} ok, {n['failed']} failed, {n['skipped']} skipped"


class SweepSummary(Callback):
    """Prints how many cells finished, failed or were skipped; exit code 1 if any failed."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        shutil.rmtree(Path(config.hydra.sweep.dir) / CELLS, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        cells = read_cells(config.hydra.sweep.dir)
        print(summary_line(cells), flush=True)
        failed = [c for c in cells if c["status"] == "failed"]
        for c in failed:
            print(f"  failed: {c['dir']}: {c['error']}", file=sys.stderr, flush=True)
        if failed:
            sys.exit(1)
