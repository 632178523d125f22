"""``comparison.json``: the protocol of a tuned comparison and each strategy's tuned
hyperparameters, written by the comparison tool into the directory the report reads.

Schema: ``{"protocol": {"trials", "objective", "direction", "tuning_seed", "eval_seeds", "steps",
"val_per_class", "sampler", "label_budget"}, "strategies": {"<name>": {"best_params": {"<override
key>": value}, "best_value": float, "trials": int}}}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transfer_lab.errors import ConfigError

FILE = "comparison.json"
# protocol fields in the order the report states them, with how they read
PROTOCOL = (("trials", "Optuna trials per strategy"), ("sampler", "sampler"),
            ("objective", "objective"), ("direction", "direction"), ("tuning_seed", "tuning seed"),
            ("eval_seeds", "evaluation seeds"), ("steps", "target optimizer steps"),
            ("val_per_class", "validation labels per class"), ("label_budget", "label budget (tuned at)"),
            ("eval_budgets", "label budgets evaluated"))


def read_comparison(root: str | Path) -> dict[str, Any] | None:
    """``comparison.json`` of ``root`` or of its parent (the comparison tool writes it to ``D/``
    and evaluates into ``D/eval``, which is what the report is run on), checked against the
    schema; None when neither has one."""
    path = next((d / FILE for d in (Path(root), Path(root).resolve().parent) if (d / FILE).is_file()), None)
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: not readable JSON ({e}); rewrite it with the comparison tool") from e
    if not isinstance(data, dict) or not isinstance(data.get("protocol"), dict) \
            or not isinstance(data.get("strategies"), dict):
        raise ConfigError(f"{path}: needs objects 'protocol' and 'strategies' (see the report docs)")
    for name, s in data["strategies"].items():
        if not isinstance(s, dict) or not isinstance(s.get("best_params"), dict):
            raise ConfigError(f"{path}: strategies.{name}.best_params must be an object of overrides")
    return data


def merge_comparisons(found: list[tuple[Path, dict[str, Any] | None]]) -> dict[str, Any] | None:
    """One comparison from those of several directories read by one report (a comparison run in
    parts, each part tuning other strategies under the same protocol): their protocols must be
    equal and no strategy tuned twice with other results. None when no directory has one; a
    tuned and an untuned directory together are refused (the report would call both tuned)."""
    have = [(root, c) for root, c in found if c is not None]
    if not have:
        return None
    if len(have) < len(found):
        bare = next(root for root, c in found if c is None)
        raise ConfigError(f"{bare}: no {FILE}, but {have[0][0]} has one: a tuned and an untuned "
                          "directory in one report (report them apart)")
    (first, merged), rest = have[0], have[1:]
    merged = {**merged, "strategies": dict(merged["strategies"]),
              "commands": dict(merged.get("commands") or {})}
    for root, c in rest:
        differ = sorted(k for k in set(merged["protocol"]) | set(c["protocol"])
                        if merged["protocol"].get(k) != c["protocol"].get(k))
        if differ:
            raise ConfigError(f"{root}: its {FILE} protocol differs from {first}'s in "
                              f"{', '.join(differ)}: comparisons under different protocols "
                              "cannot share a table (report them apart)")
        for name, s in c["strategies"].items():
            if merged["strategies"].setdefault(name, s) != s:
                raise ConfigError(f"{root}: strategy {name} is tuned in {first} too, with other "
                                  "results: which configuration a row is would be ambiguous")
        merged["commands"].update(c.get("commands") or {})
    return merged


def is_tuning_trial(result: dict) -> bool:
    """A cell of a tuning sweep (``hparams_search=<strategy>``), not an evaluation cell."""
    return bool((result.get("choices") or {}).get("hparams_search"))


def protocol_markdown(comparison: dict | None, root: str | Path, tuning_trials: int = 0) -> str:
    """The protocol block (``comparison.json`` present) or the statement that nothing was tuned."""
    if comparison is None:
        return ("**Hyperparameters: untuned.** No `comparison.json` where the report read: every cell ran "
                "at its configured values — the YAML defaults of `conf/strategy/` and `conf/optimizer/`, "
                "unless a column of the table varies them. A strategy's score may reflect its defaults more "
                "than the method.\n")
    p = comparison["protocol"]
    lines = ["## Protocol", "", "Each strategy tuned with the same number of Optuna trials on the "
             "validation metric (the test split is never seen while tuning), its best configuration "
             "re-trained with the evaluation seeds:", ""]
    lines += [f"- {label}: {json.dumps(p[k]) if isinstance(p[k], list) else p[k]}"
              for k, label in PROTOCOL if k in p]
    if tuning_trials:
        lines += ["", f"{tuning_trials} tuning trial cells (`hparams_search=`) below {root} are not in "
                      "the tables: their seed is the tuning seed."]
    return "\n".join(lines) + "\n"
