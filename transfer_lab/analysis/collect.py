"""The one results loader: every results.json below a directory, read once, its config flattened
into the keys a cell is grouped by. ``report`` and ``analysis`` both read results through here.

A cell's group keys are its resolved config (flattened, ``target.data.samples_per_class``) and its
config-group choices (named by where they land: ``model@source.model`` → ``source.model``), minus
the seed (what a group averages over) and ``transfer_lab.results.NON_RESULT_KEYS`` (how a run is
executed, logged or stored: a sweep over ``logger`` must not split groups).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer_lab.results import NON_RESULT_KEYS

# never grouping keys: the seed is what a group averages over; the rest does not change a result,
# or (per_strategy: <experiment>_<strategy>, conf/train.yaml) only says which values the config got
IGNORED = frozenset({"seed", "per_strategy", *NON_RESULT_KEYS})
# the label budget: the key tables are split by and plotted against
BUDGET = "target.data.samples_per_class"
# headline metrics in table order: the first a run has is its metric
METRICS = ("acc", "r2")
# the report writes its own files below the root it reads: never read them back as cells
REPORT_DIR = "report"


@dataclass
class Cell:
    """One finished run: its directory, its results.json and its flattened group keys."""

    path: Path
    result: dict[str, Any]
    keys: dict[str, Any] = field(default_factory=dict)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts → ``{"a.b.c": value}``; lists stay values (as compact JSON, hashable)."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(obj) if isinstance(obj, list) else obj}


def choice_column(group: str) -> str:
    """``model@source.model`` → ``source.model``: a choice is named by where it lands."""
    return group.split("@", 1)[-1]


def headline(metrics: dict) -> str | None:
    """``acc``, or ``r2`` for a regression run (no ``test/acc``); None: the run measured neither."""
    return next((m for m in METRICS if metrics.get(f"test/{m}") is not None), None)


def group_keys_of(result: dict) -> dict[str, Any]:
    """The keys a cell is grouped by (see the module docstring). A null value becomes ``"null"``
    so that it differs from a key an older results.json does not have at all (left out)."""
    keys = {k: "null" if v is None else v for k, v in flatten(result.get("config") or {}).items()
            if k.split(".")[0] not in IGNORED}
    for group, value in (result.get("choices") or {}).items():
        where = choice_column(group)
        if where.split(".")[0] not in IGNORED:
            keys[where] = "null" if value is None else value
    keys["strategy"] = result.get("strategy")
    return keys


def find_results(root: str | Path) -> list[Path]:
    """Every results.json below ``root`` (sorted), except those inside a report directory."""
    root = Path(root)
    return [p for p in sorted(root.rglob("results.json"))
            if REPORT_DIR not in p.relative_to(root).parts[:-1]]


def problem(path: Path, status: str, error: str, stage: str | None = None) -> dict[str, Any]:
    return {"path": str(path), "status": status, "stage": stage, "error": error}


def read_cell(path: Path) -> Cell | dict[str, Any]:
    """A ``Cell`` for a finished run with a headline metric, else its problem record."""
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return problem(path.parent, "unreadable", f"{type(e).__name__}: {e}")
    status = res.get("status", "?")
    if status == "failed":
        return problem(path.parent, "failed", one_line(res.get("error", "?")), res.get("stage"))
    if status != "ok":
        return problem(path.parent, status, "the run did not finish: no final results")
    if headline(res.get("metrics") or {}) is None:
        return problem(path.parent, "no metric", "status ok but no test/acc or test/r2")
    return Cell(path.parent, res, group_keys_of(res))


def one_line(error: Any) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else "?"


def load(root: str | Path) -> tuple[list[Cell], list[dict[str, Any]]]:
    """Every results.json below ``root``: the finished cells, and one record per cell that is not
    (``status``: ``failed`` with its ``stage`` and one-line ``error``; ``running``/``unreadable``/
    ``no metric``; ``incomplete``: a Hydra job directory without a results.json)."""
    root = Path(root)
    cells, problems, seen = [], [], set()
    for path in find_results(root):
        seen.add(path.parent)
        got = read_cell(path)
        (cells if isinstance(got, Cell) else problems).append(got)
    for hydra_dir in sorted(root.rglob(".hydra")):
        job = hydra_dir.parent
        if job not in seen and REPORT_DIR not in job.relative_to(root).parts:
            problems.append(problem(job, "incomplete", "no results.json"))
    return cells, problems


def is_failure(p: dict[str, Any]) -> bool:
    """A cell that ran and failed (counted as failed), as opposed to one that never finished."""
    return p["status"] == "failed"
