"""Grouping a sweep's seeds: the ``vectorized`` Hydra launcher (the default) writes every cell's
results.json as the ordinary sweep would; a group killed mid-training resumes from its checkpoint
and a re-run skips the finished cells. The sweep subprocess finds the plugin through a
``hydra_plugins`` link on ``sys.path`` (``mapped_plugins``, a local helper), as an install of the
project does through pyproject's second ``packages.find`` root; that root is tested here too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY, compose_cfg
from safetensors.torch import load_file

from transfer_lab.vectorized import launcher_check
from transfer_lab.vectorized.group import cheap_check, group_key

ROOT = Path(__file__).resolve().parents[1]


def test_group_key_ignores_only_the_seed():
    a = group_key(["strategy=lora", "seed=0", "target.epochs=2"])
    assert a == group_key(["target.epochs=2", "seed=7", "strategy=lora"])
    assert a != group_key(["strategy=lora", "seed=0", "target.epochs=3"])
    assert group_key(["+seed=1", "x=1"]) == group_key(["x=1"])


@pytest.mark.parametrize(("overrides", "ok"), [
    (["strategy=finetune"], True), (["strategy=lora"], True),
    (["strategy=dann"], False), (["strategy=gradual_unfreeze"], False),
    (["strategy=finetune", "vectorize_seeds=false"], False),
    (["strategy=finetune", "trainer.devices=2", "trainer.strategy=ddp"], False),
    (["strategy=finetune", "optimizer@target.optimizer=sgd"], True),
    (["strategy=finetune", "trainer=fast"], False),
    (["strategy=finetune", "callbacks=early_stopping"], False),
    # schedules and best-validation selection are per seed; early stopping would stop all K at once
    (["strategy=finetune", "scheduler@target.scheduler=cosine"], True),
    (["strategy=finetune", "scheduler@target.scheduler=onecycle"], True),
    (["strategy=finetune", "target.select=best_val"], True),
    (["strategy=finetune", "target.select=best_val", "target.monitor=val/loss"], True),
    (["strategy=finetune", "target.select=best_val", "target.monitor=val/balanced_acc"], False),
    (["strategy=finetune", "+target.early_stopping.patience=3"], False),
    (["strategy=finetune", "experiment=quickstart"], True),
])
def test_cheap_check_decides_from_the_config_alone(overrides, ok):
    got, why = cheap_check(compose_cfg(*overrides))
    assert got is ok and why


def mapped_plugins(tmp: Path) -> str:
    """A ``hydra_plugins`` → ``transfer_lab/vectorized/hydra_plugins`` link on a path of its own."""
    (tmp / "plugins").mkdir()
    (tmp / "plugins" / "hydra_plugins").symlink_to(ROOT / "transfer_lab" / "vectorized" / "hydra_plugins")
    return str(tmp / "plugins")


# sitecustomize for a sweep subprocess: the first group of strategy $KILL_GROUP_OF is SIGKILLed
# (no cleanup, as a crash or an OOM kill) at the end of its second epoch
KILL_HOOK = """
import os, signal
if os.environ.get("KILL_GROUP_OF"):
    from lightning.pytorch.callbacks import Callback
    import transfer_lab.vectorized.group as group

    class _Kill(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                os.kill(os.getpid(), signal.SIGKILL)

    _fit = group.fit_seeds

    def _fit_and_die(models, strategies, *args, **kwargs):
        if type(strategies[0]).__name__ == os.environ["KILL_GROUP_OF"]:
            args[3].callbacks.append(_Kill())  # (dms, optimizer, lr, trainer)
        return _fit(models, strategies, *args, **kwargs)

    group.fit_seeds = _fit_and_die
"""
SWEEP = ["seed=0,1,2", "strategy=scratch,finetune", "source.epochs=1", "target.epochs=4",
         "transferability=false", "scheduler@target.scheduler=cosine", "target.select=best_val",
         "hydra.sweep.subdir=${hydra.job.num}"]  # every override in the name is too long a file name


def sweep(tmp: Path, name: str, *extra: str, kill: str | None = None) -> tuple[str, dict, dict]:
    """The sweep (default launcher: vectorized) in a subprocess; ``{(strategy, seed): results}``
    and their directories. ``kill``: a strategy class whose group is killed mid-training."""
    plugins = str(tmp / "plugins") if (tmp / "plugins").exists() else mapped_plugins(tmp)
    (tmp / "hook").mkdir(exist_ok=True)
    (tmp / "hook" / "sitecustomize.py").write_text(KILL_HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), plugins, str(tmp / "hook")]),
           "TRANSFER_LAB_STORE": str(tmp / "store"), "KILL_GROUP_OF": kill or ""}
    cmd = [sys.executable, "-m", "transfer_lab.train", "-m", *TINY, *SWEEP,
           f"hydra.sweep.dir={tmp / name}", *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp, timeout=600)
    assert proc.returncode == (-signal.SIGKILL if kill else 0), proc.stderr[-2000:]
    files = sorted((tmp / name).glob("*/results.json"))
    res = {(r["strategy"], r["seed"]): r for r in (json.loads(f.read_text()) for f in files)}
    return proc.stdout + proc.stderr, res, {key: f.parent for key, f in zip(res, files)}


@pytest.mark.slow
def test_a_killed_vectorised_sweep_resumes_per_cell_and_equals_the_plain_sweep(tmp_path):
    # the finetune group is killed mid-training, after the scratch group wrote its three cells
    _, first, first_dirs = sweep(tmp_path, "vec", kill="Finetune")
    assert sorted(first) == [("scratch", s) for s in (0, 1, 2)]
    assert list((tmp_path / "vec" / ".vectorized").glob("*/seeds-0-1-2/checkpoints/last.ckpt"))
    stamps = {key: (d / "results.json").stat().st_mtime_ns for key, d in first_dirs.items()}
    log, vec, dirs = sweep(tmp_path, "vec")  # the same command again
    assert "sweep: 3 ok, 0 failed, 3 skipped" in log and log.count("skipped (done)") == 6
    assert stamps == {key: (dirs[key] / "results.json").stat().st_mtime_ns for key in stamps}
    assert all(vec[("finetune", s)]["target_training"]["resumed_after_epoch"] is not None for s in (0, 1, 2))
    _, plain, plain_dirs = sweep(tmp_path, "plain", "vectorize_seeds=false")
    assert sorted(vec) == sorted(plain) and len(vec) == 6
    for key in vec:
        v, p = vec[key], plain[key]
        assert v["target_training"]["vectorized_seeds"] == [0, 1, 2]
        assert "vectorized_seeds" not in p["target_training"]
        assert set(v) == set(p) and v["status"] == "ok"
        # each seed's own curve judged by the run's rule, its own best-validation step tested
        for k in ("converged", "n_evals", "steps"):
            assert v["convergence"][k] == p["convergence"][k], (key, k)
        assert v["selection"].keys() == p["selection"].keys() and v["selection"]["select"] == "best_val"
        assert v["selection"]["step"] == p["selection"]["step"]
        assert v["selection"]["value"] == pytest.approx(p["selection"]["value"], abs=1e-4)
        assert v["metrics"].keys() == p["metrics"].keys()
        for k, x in p["metrics"].items():
            assert v["metrics"][k] == pytest.approx(x, abs=1e-4), (key, k)
        wv = load_file(dirs[key] / v["weights"]["file"])
        wp = load_file(plain_dirs[key] / p["weights"]["file"])
        assert all((wv[k].double() - wp[k].double()).abs().max() < 1e-4 for k in wp)
        assert (dirs[key] / ".hydra" / "overrides.yaml").is_file()  # run_job still ran the cell
    assert any(p["selection"]["step"] < p["target_training"]["steps"] for p in plain.values())
    stamps = {key: (d / "results.json").stat().st_mtime_ns for key, d in dirs.items()}
    again, _, _ = sweep(tmp_path, "vec")
    assert "as one vectorised model" not in again and again.count("skipped (done)") == 6
    assert "sweep: 0 ok, 0 failed, 6 skipped" in again
    assert stamps == {key: (d / "results.json").stat().st_mtime_ns for key, d in dirs.items()}


def test_an_install_puts_the_launcher_into_the_hydra_plugins_namespace():
    # setuptools' own discovery over pyproject's roots: what a wheel or `pip install -e .` ships
    tomllib = pytest.importorskip("tomllib")
    from setuptools import find_namespace_packages

    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    found = {root: find_namespace_packages(str(ROOT / root), include=find["include"], exclude=find["exclude"])
             for root in find["where"]}
    assert "hydra_plugins.transfer_lab_launcher" in found["transfer_lab/vectorized"]
    assert "transfer_lab.vectorized" in found["."]
    assert not any(p.startswith("transfer_lab.vectorized.hydra_plugins") for p in found["."])
    # a namespace portion (no __init__.py): Hydra's pkgutil scan lists it beside other plugins
    assert not (ROOT / "transfer_lab" / "vectorized" / "hydra_plugins" / "__init__.py").exists()


def launcher_cfg(*hydra_overrides: str):
    from omegaconf import OmegaConf

    return OmegaConf.create({"hydra": {"launcher": {"_target_": launcher_check.PLUGIN, "min_group": 2},
                                       "overrides": {"hydra": list(hydra_overrides)}}})


def test_a_missing_plugin_asked_for_is_one_line_and_exit_2(monkeypatch, capsys):
    monkeypatch.setattr(launcher_check, "installed", lambda: False)
    with pytest.raises(SystemExit) as e:
        launcher_check.LauncherInstalled().on_multirun_start(launcher_cfg("hydra/launcher=vectorized"))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "pip install -e ." in err


def test_a_missing_plugin_by_default_falls_back_to_the_basic_launcher(monkeypatch):
    monkeypatch.setattr(launcher_check, "installed", lambda: False)
    cfg = launcher_cfg()
    launcher_check.LauncherInstalled().on_multirun_start(cfg)
    assert cfg.hydra.launcher._target_ == launcher_check.BASIC
    monkeypatch.setattr(launcher_check, "installed", lambda: True)
    cfg = launcher_cfg("hydra/launcher=vectorized")
    launcher_check.LauncherInstalled().on_multirun_start(cfg)
    assert cfg.hydra.launcher._target_ == launcher_check.PLUGIN


def test_the_job_loop_reuses_each_config_the_launcher_composed_once():
    import importlib.util

    path = ROOT / "transfer_lab" / "vectorized" / "hydra_plugins" / "transfer_lab_launcher" / "vectorized_launcher.py"
    spec = importlib.util.spec_from_file_location("vectorized_launcher_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    class Loader:
        calls: list = []
        other = "passed through"

        def load_sweep_config(self, master, overrides):
            self.calls.append(list(overrides))
            return {"fresh": overrides}

    loader = module._Composed(Loader(), {("seed=0",): {"composed": 0}})
    assert loader.load_sweep_config(None, ["seed=0"]) == {"composed": 0}
    assert loader.load_sweep_config(None, ["seed=0"]) == {"fresh": ["seed=0"]}  # once only
    assert Loader.calls == [["seed=0"]] and loader.other == "passed through"
