"""A tuned comparison in one command: every strategy gets the same number of Optuna trials on the
validation metric (tuning seed), each best configuration is re-trained with the evaluation seeds,
then the report runs.

    python -m transfer_lab.compare experiment=quickstart strategies=[scratch,finetune,linear_probe] \\
        trials=20 tuning_seed=0 eval_seeds=[1,2,3] dir=multirun/compare_quickstart [overrides ...]

``dir``/tune/<strategy>/ holds each study (Hydra's ``optimization_results.yaml`` and every trial's
results.json), ``dir``/eval/<strategy>/ the re-trained cells, ``dir``/comparison.json the protocol
and each strategy's tuned hyperparameters. Other ``key=value`` arguments are passed to every run
(e.g. ``target.steps=400``). ``n_jobs=N`` runs N trials / cells at once (joblib launcher);
``val_per_class=N`` (or ``label``: as many as the label budget) sets the validation images per class.
``eval_budgets=[5,10,50,200]`` also re-trains each tuned configuration at those label budgets
(budgets × eval seeds per strategy); without it only the tuned budget is evaluated.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from transfer_lab.analysis.collect import BUDGET  # target.data.samples_per_class
from transfer_lab.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
KEYS = ("experiment", "strategies", "trials", "tuning_seed", "eval_seeds", "dir", "n_jobs",
        "val_per_class", "report", "eval_budgets")
Runner = Callable[[list[str]], int]  # runs a command, returns its exit code


@dataclass
class Plan:
    strategies: list[str]
    dir: Path
    eval_seeds: list[int]
    experiment: str | None = None
    trials: int = 20
    tuning_seed: int = 0
    n_jobs: int = 1
    val_per_class: int | str | None = None
    report: bool = True
    eval_budgets: list[int] | None = None  # None: evaluate at the tuned budget only
    extra: list[str] = field(default_factory=list)


def _as_list(value: Any, key: str) -> list:
    if isinstance(value, str):  # strategies=a,b,c
        value = [v for v in value.split(",") if v]
    if not isinstance(value, Sequence) or isinstance(value, str) or not value:
        raise ConfigError(f"{key}={value!r}: give a non-empty list, e.g. {key}=[a,b]")
    return list(value)


def _budget(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():  # eval_budgets=5,10 (split as strings)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"eval_budgets: {value!r} is not a label budget (an integer ≥ 1 labels per class)")
    return value


def parse_args(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> Plan:
    """The compare keys of ``argv`` as a ``Plan``; every other argument is passed to the runs."""
    own = [a for a in argv if a.split("=", 1)[0] in KEYS]
    extra = [a for a in argv if a not in own]
    bad = [a for a in extra if "=" not in a]
    if bad:
        raise ConfigError(f"{bad[0]}: arguments are key=value ({', '.join(KEYS)}, or an override for the runs)")
    args = OmegaConf.to_container(OmegaConf.from_dotlist(own))
    for key in ("strategies", "dir"):
        if args.get(key) in (None, ""):
            raise ConfigError(f"{key}: required, e.g. strategies=[scratch,finetune] dir=multirun/compare")
    plan = Plan(strategies=[str(s) for s in _as_list(args["strategies"], "strategies")], dir=Path(args["dir"]),
                eval_seeds=[int(s) for s in _as_list(args.get("eval_seeds", [1, 2, 3]), "eval_seeds")],
                experiment=args.get("experiment"), trials=int(args.get("trials", 20)),
                tuning_seed=int(args.get("tuning_seed", 0)), n_jobs=int(args.get("n_jobs", 1)),
                val_per_class=args.get("val_per_class"), report=bool(args.get("report", True)), extra=extra,
                eval_budgets=None if args.get("eval_budgets") is None
                else [_budget(b) for b in _as_list(args["eval_budgets"], "eval_budgets")])
    check_plan(plan, conf_dir)
    return plan


def check_plan(plan: Plan, conf_dir: Path = CONF_DIR) -> None:
    if plan.tuning_seed in plan.eval_seeds:
        raise ConfigError(f"tuning_seed={plan.tuning_seed} is also in eval_seeds={plan.eval_seeds}: the "
                          "evaluation seeds must not have been seen by the tuning (pick another tuning_seed)")
    valid = sorted(p.stem for p in (conf_dir / "hparams_search").glob("*.yaml"))
    unknown = [s for s in plan.strategies if s not in valid]
    if unknown:
        raise ConfigError(f"strategies: {unknown[0]} has no search space conf/hparams_search/{unknown[0]}.yaml; "
                          f"valid: {', '.join(valid)}")
    if plan.trials < 1 or plan.n_jobs < 1:
        raise ConfigError(f"trials={plan.trials}, n_jobs={plan.n_jobs}: both must be ≥ 1")
    if len(set(plan.strategies)) != len(plan.strategies):
        raise ConfigError(f"strategies={plan.strategies}: a strategy is listed twice")
    if plan.val_per_class is not None and plan.val_per_class != "label" and int(plan.val_per_class) < 1:
        raise ConfigError(f"val_per_class={plan.val_per_class}: a count ≥ 1, or label (= the label budget)")
    if plan.eval_budgets is not None and len(set(plan.eval_budgets)) != len(plan.eval_budgets):
        raise ConfigError(f"eval_budgets={plan.eval_budgets}: a budget is listed twice")


def search_key(conf_dir: Path = CONF_DIR) -> str:
    """``hparams_search`` when conf/train.yaml has it in its defaults list, else ``+hparams_search``."""
    defaults = yaml.safe_load((conf_dir / "train.yaml").read_text()).get("defaults", [])
    has = any(isinstance(d, dict) and "hparams_search" in d for d in defaults)
    return "hparams_search" if has else "+hparams_search"


def common(plan: Plan) -> list[str]:
    """The overrides every tuning trial and every evaluation cell shares."""
    out = [f"experiment={plan.experiment}"] if plan.experiment else []
    if plan.val_per_class is not None:  # the data module's exact count; "budget" = the label budget
        n = "budget" if plan.val_per_class == "label" else int(plan.val_per_class)
        out.append(f"target.data.val_per_class={n}")
    return [*out, *plan.extra]


def _compose(overrides: list[str], conf_dir: Path = CONF_DIR):
    """``train``'s config with ``overrides`` (Hydra's compose API); any Hydra error as one line."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            return compose("train", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # noqa: BLE001 — Hydra's errors of any kind become one line
        raise ConfigError(" ".join(str(e).split())) from None


def pinned(shared: list[str], conf_dir: Path = CONF_DIR) -> list[str]:
    """The keys a preset sweeps itself (its ``hydra.sweeper.params``, e.g. label_budget's budgets),
    fixed at the run's value: the Optuna sweeper would otherwise search them with the strategy's
    space, and an evaluation would sweep them. ``strategy``/``seed`` and keys set on the command line
    are left alone."""
    cfg = _compose(shared, conf_dir)
    given = {a.split("=", 1)[0].lstrip("+~") for a in shared}
    out = []
    for key in (cfg.hydra.sweeper.get("params") or {}):
        if key.lstrip("+~") in {"strategy", "seed", *given}:
            continue
        name = key.lstrip("+~")
        value = OmegaConf.select(cfg, name)
        if OmegaConf.is_config(value):
            raise ConfigError(f"{name}: the preset sweeps it (hydra.sweeper.params); give {name}=... on the "
                              "command line to fix it for the comparison")
        out.append(f"{name}={override_value(value)}")
    return out


def _launcher(plan: Plan) -> list[str]:
    return ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={plan.n_jobs}"] if plan.n_jobs > 1 else []


def tune_command(plan: Plan, strategy: str, shared: list[str], key: str) -> list[str]:
    return [sys.executable, "-m", "transfer_lab.train", "-m", *shared, f"strategy={strategy}",
            f"{key}={strategy}", f"hydra.sweeper.n_trials={plan.trials}", f"hydra.sweeper.n_jobs={plan.n_jobs}",
            *_launcher(plan), f"seed={plan.tuning_seed}", f"hydra.sweep.dir={plan.dir / 'tune' / strategy}",
            # short cell directories: the default (every override in the name) passes the 255-byte
            # file-name limit with a few pass-through overrides; the seeded sampler keeps trial i's params
            "hydra.sweep.subdir=trial_${hydra.job.num}"]


def eval_command(plan: Plan, strategy: str, shared: list[str], best_params: dict) -> list[str]:
    """Re-train the tuned configuration with the evaluation seeds (× ``eval_budgets`` when given)."""
    budgets, subdir = [], "seed_${seed}"
    if plan.eval_budgets is not None:  # the sweep's budgets replace a budget override of the runs
        shared = [a for a in shared if a.split("=", 1)[0].lstrip("+") != BUDGET]
        budgets = [f"{BUDGET}={','.join(str(b) for b in plan.eval_budgets)}"]
        subdir = "spc${" + BUDGET + "}_seed_${seed}"
    return [sys.executable, "-m", "transfer_lab.train", "-m", *shared, f"strategy={strategy}",
            *(f"{k}={override_value(v)}" for k, v in best_params.items()), *budgets, *_launcher(plan),
            f"seed={','.join(str(s) for s in plan.eval_seeds)}",
            f"hydra.sweep.dir={plan.dir / 'eval' / strategy}", f"hydra.sweep.subdir={subdir}"]


def override_value(v: Any) -> str:
    """A tuned value as a Hydra override value (strings quoted when Hydra would parse them)."""
    if isinstance(v, bool) or v is None:
        return {True: "true", False: "false", None: "null"}[v]
    if isinstance(v, (int, float)):
        return repr(v)
    s = str(v)
    plain = s.replace("_", "").replace(".", "").replace("-", "").isalnum()
    return s if plain else "'" + s.replace("'", "\\'") + "'"


def compose_protocol(plan: Plan, strategy: str, key: str, shared: list[str]) -> dict:
    """The study's protocol as the tuning run will see it (Hydra's compose API): bad overrides
    fail here, before any training."""
    overrides = [*shared, f"strategy={strategy}", f"{key}={strategy}", f"seed={plan.tuning_seed}",
                 f"hydra.sweeper.n_trials={plan.trials}"]
    try:
        cfg = _compose(overrides)
    except ConfigError as e:
        raise ConfigError(f"strategy={strategy}: {e}") from None
    objective = str(cfg.get("optimized_metric") or "")
    if not objective.startswith("val/"):
        raise ConfigError(f"optimized_metric={objective or None}: tuning optimises a validation metric "
                          "(val/...); the test split is never seen by the sweeper")
    data, sweeper = cfg.target.data, cfg.hydra.sweeper
    return {"trials": plan.trials, "objective": objective, "direction": str(sweeper.direction),
            "tuning_seed": plan.tuning_seed, "eval_seeds": plan.eval_seeds,
            "steps": cfg.target.get("steps"), "epochs": cfg.target.get("epochs"),
            # null: val_fraction of each class's pool, capped at max_val_per_class (what the data
            # module reports per run: results.json data.target.val_counts)
            "val_per_class": data.get("val_per_class"), "val_fraction": data.get("val_fraction"),
            "max_val_per_class": data.get("max_val_per_class"),
            "sampler": str(sweeper.sampler._target_).rsplit(".", 1)[-1],
            "label_budget": data.get("samples_per_class"), "experiment": plan.experiment,
            # the budgets the tuned configurations are evaluated at (tuned at label_budget only)
            "eval_budgets": plan.eval_budgets or [data.get("samples_per_class")]}


def tuned(plan: Plan, strategy: str) -> dict:
    """A finished study: its best parameters, their validation score, and how many trials ran."""
    study = plan.dir / "tune" / strategy
    path = study / "optimization_results.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: missing — the tuning of {strategy} did not finish")
    res = yaml.safe_load(path.read_text()) or {}
    if "best_params" not in res or "best_value" not in res:
        raise ConfigError(f"{path}: no best_params/best_value (not a finished Optuna study)")
    trials = [_status(p) for p in study.rglob("results.json")]
    return {"best_params": dict(res["best_params"]), "best_value": float(res["best_value"]),
            "trials": len(trials), "failed_trials": sum(st != "ok" for st in trials)}


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def shown(cmd: list[str]) -> str:
    """A command as a user would type it (``python`` for the interpreter's path)."""
    return " ".join(["python", *cmd[1:]])


def run_command(cmd: list[str]) -> int:
    print(f"+ {shown(cmd)}", flush=True)
    return subprocess.run(cmd).returncode


def compare(plan: Plan, runner: Runner = run_command) -> dict:
    """Tune, write ``comparison.json``, re-train with the evaluation seeds, report."""
    from transfer_lab.io import atomic_write_json

    key = search_key()
    protocols = {}
    for s in plan.strategies:  # every command line is checked before anything trains
        protocols[s] = compose_protocol(plan, s, key, common(plan))
        if plan.val_per_class == "label" and protocols[s]["label_budget"] is None:
            raise ConfigError("val_per_class=label: target.data.samples_per_class is not set (no label budget)")
    shared = common(plan)
    shared += pinned(shared)
    for s in plan.strategies:
        # a sweep with a failed cell exits 1 (a diverged trial is a failed trial, not an error):
        # the study counts when Hydra wrote its optimization_results.yaml (checked by ``tuned``)
        cmd = tune_command(plan, s, shared, key)
        if runner(cmd) == 2:  # a bad command line
            raise RuntimeError(f"the tuning of {s} was refused (exit code 2): {shown(cmd)}")
    result = {"protocol": compose_protocol(plan, plan.strategies[0], key, shared),
              "strategies": {s: tuned(plan, s) for s in plan.strategies}}
    differ = {s for s, p in protocols.items() if p["objective"] != result["protocol"]["objective"]}
    if differ:
        raise ConfigError(f"strategies {sorted(differ)} optimise another objective than "
                          f"{result['protocol']['objective']}: one objective per comparison")
    result["commands"] = {s: {"tune": shown(tune_command(plan, s, shared, key)),
                              "eval": shown(eval_command(plan, s, shared, r["best_params"]))}
                          for s, r in result["strategies"].items()}
    atomic_write_json(plan.dir / "comparison.json", result)
    failed = [s for s, r in result["strategies"].items()
              if runner(eval_command(plan, s, shared, r["best_params"]))]
    if plan.report and runner([sys.executable, "-m", "transfer_lab.report", str(plan.dir / "eval")]):
        failed.append("report")
    if failed:  # after the report: the cells that did finish are still reported
        raise RuntimeError(f"failed: {', '.join(failed)} (see the output above; re-running resumes)")
    return result


def main(argv: Sequence[str] | None = None, runner: Runner = run_command) -> int:
    try:
        compare(parse_args(sys.argv[1:] if argv is None else argv), runner)
    except (ConfigError, RuntimeError) as e:  # a bad command line: 2; a failed run: 1
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
