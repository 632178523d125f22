"""Sweeps: source trained once per key, resumable cells and checkpoints, job placement, presets."""

import json
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import CONF, TINY, compose_cfg
from transfer_lab.errors import ConfigError
from transfer_lab.module import TransferModule
from transfer_lab.report import report
from transfer_lab.results import completed
from transfer_lab.run import run
from transfer_lab.train import main, placement


def multirun(monkeypatch, *overrides):
    """``python -m transfer_lab.train -m ...`` in this process (the basic launcher runs jobs here)."""
    monkeypatch.setattr(sys, "argv", ["transfer_lab.train", "-m", *TINY, *overrides])
    try:
        main()
    finally:
        GlobalHydra.instance().clear()


def results_under(d):
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(d.rglob("results.json"))}


@pytest.mark.slow
def test_sweep_trains_each_source_once_resumes_and_reports(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    args = ["strategy=scratch,finetune,linear_probe", "seed=0,1", f"store_dir={tmp_path}/store",
            f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}"]
    multirun(monkeypatch, *args)
    first = results_under(sweep)
    assert len(first) == 6 and all(r["status"] == "ok" for r in first.values())
    trained = [r for r in first.values() if r["source"]["cache_hit"] is False]
    assert sorted(r["seed"] for r in trained) == [0, 1]  # finetune + linear_probe share it per seed
    assert all(r["source"]["cache_hit"] is None for r in first.values() if r["strategy"] == "scratch")
    assert not any((sweep / n / "checkpoints").exists() for n in first)  # resume state cleaned up
    mtimes = {p: p.stat().st_mtime_ns for p in sweep.rglob("results.json")}
    capsys.readouterr()

    t0 = time.perf_counter()
    multirun(monkeypatch, *args)  # the same command again: every cell is done
    assert time.perf_counter() - t0 < 15
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("results.json")} == mtimes
    out = capsys.readouterr().out
    assert out.count("skipped (done)") == 6 and "sweep: 0 ok, 0 failed, 6 skipped" in out

    res = report(sweep, plot=False)
    t = res["table"]
    assert res["keys"] == ["strategy", "target.data.samples_per_class"]
    assert len(t) == 3 and (t["n"] == 2).all()
    assert not res["problems"]


@pytest.mark.slow
def test_resume_only_for_the_same_config_and_can_be_turned_off(tmp_path):
    cfg = compose_cfg("strategy=scratch", store=tmp_path / "store")
    res = run(cfg, tmp_path / "cell")
    assert completed(cfg, tmp_path / "cell")["metrics"] == res["metrics"]
    other = compose_cfg("strategy=scratch", "target.epochs=3", store=tmp_path / "store")
    assert completed(other, tmp_path / "cell") is None  # a changed config re-runs the cell
    assert completed(compose_cfg("strategy=scratch", "++resume=false"), tmp_path / "cell") is None
    # where the store is, and how it is logged, do not change the result
    assert completed(compose_cfg("strategy=scratch", "logger=none", store=tmp_path / "s2"),
                     tmp_path / "cell") is not None


@pytest.mark.slow
def test_killed_cell_resumes_from_its_last_checkpoint(tmp_path, monkeypatch):
    cfg = compose_cfg("strategy=finetune", "target.epochs=4", store=tmp_path / "store")
    original = TransferModule.on_train_epoch_end
    epochs_run, batches = [], []

    def crash_after_epoch_1(self):
        original(self)
        if self.trainer.checkpoint_callback is None:  # the source stage: not the cell being killed
            return
        epochs_run.append(self.current_epoch)
        batches.append(self.trainer.num_training_batches)
        if crash and self.current_epoch == 1:
            raise KeyboardInterrupt  # as if killed during epoch 1: last.ckpt holds epoch 0

    monkeypatch.setattr(TransferModule, "on_train_epoch_end", crash_after_epoch_1)
    crash = True
    with pytest.raises(BaseException):
        run(cfg, tmp_path / "cell")
    assert (tmp_path / "cell" / "checkpoints" / "last.ckpt").exists()
    assert completed(cfg, tmp_path / "cell") is None
    crash, epochs_run[:] = False, []
    res = run(cfg, tmp_path / "cell")
    # 4 epochs of optimizer steps in all: the resumed run counts on from the checkpoint's step
    assert res["target_training"] == {"epochs": 4, "steps": 4 * batches[0], "world_size": 1,
                                      "resumed_after_epoch": 0}
    assert epochs_run == [1, 2, 3]  # continued, not restarted: 4 epochs in all
    assert not (tmp_path / "cell" / "checkpoints").exists()


@pytest.mark.slow
def test_hparams_search_optimises_the_chosen_checkpoints_validation_metric(tmp_path):
    """``hparams_search=linear_probe hydra.sweeper.n_trials=N hydra.sweep.dir=D``: N trials, each
    with its results.json under D, and D/optimization_results.yaml whose best_value is the best
    trial's validation score of the checkpoint it tested (target.select=best_val), not a test one."""
    import subprocess

    import yaml

    from conftest import ROOT

    sweep = tmp_path / "D"
    cmd = [sys.executable, "-m", "transfer_lab.train", *TINY, "hparams_search=linear_probe",
           "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", f"store_dir={tmp_path}/store",
           "target.steps=6", "target.val_check_interval=2", "target.select=best_val", "logger=none"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    trials = list(results_under(sweep).values())
    assert len(trials) == 3 and all(r["status"] == "ok" for r in trials)
    for r in trials:  # the objective is the tested (best-validation) checkpoint's val/acc
        assert r["metrics"]["val/acc"] == r["selection"]["value"] and r["selection"]["select"] == "best_val"
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(r["metrics"]["val/acc"] for r in trials))


def test_resume_takes_the_newer_of_last_and_hpc_checkpoints_and_success_removes_them(tmp_path):
    """A SLURM requeue (USR1) leaves hpc_ckpt_<n>.ckpt in the cell's directory, possibly newer than
    checkpoints/last.ckpt: resume from whichever holds more optimizer steps; a finished cell
    keeps neither."""
    from transfer_lab.builders import last_checkpoint, remove_resume_state

    cell, ckpts = tmp_path / "cell", tmp_path / "cell" / "checkpoints"
    ckpts.mkdir(parents=True)
    torch.save({"epoch": 3, "global_step": 40}, ckpts / "last.ckpt")
    torch.save({"epoch": 4, "global_step": 47}, cell / "hpc_ckpt_1.ckpt")
    assert last_checkpoint(ckpts) == (cell / "hpc_ckpt_1.ckpt", 4)
    torch.save({"epoch": 5, "global_step": 60}, ckpts / "last.ckpt")
    assert last_checkpoint(ckpts) == (ckpts / "last.ckpt", 5)
    (cell / "hpc_ckpt_2.ckpt").write_bytes(b"killed mid-write")  # unreadable: dropped, not used
    assert last_checkpoint(ckpts) == (ckpts / "last.ckpt", 5) and not (cell / "hpc_ckpt_2.ckpt").exists()
    remove_resume_state(cell)
    assert not ckpts.exists() and not list(cell.glob("hpc_ckpt_*"))


@pytest.mark.slow
def test_joblib_two_jobs_sharing_one_source_train_it_once(tmp_path, monkeypatch):
    sweep = tmp_path / "sweep"
    multirun(monkeypatch, "hydra/launcher=parallel", "hydra.launcher.n_jobs=2",
             "strategy=finetune,linear_probe", f"store_dir={tmp_path}/store",
             f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}")
    res = results_under(sweep)
    assert len(res) == 2 and {r["source"]["key"] for r in res.values()} == {res["0"]["source"]["key"]}
    assert sorted(r["source"]["cache_hit"] for r in res.values()) == [False, True]
    assert len([p for p in (tmp_path / "store").iterdir() if p.is_dir() and p.name != ".logs"]) == 1


@pytest.mark.parametrize("slot, n_slots, n_gpus, cpus, expected", [
    (0, 2, 4, [0, 1], {"gpu": 0, "cpus": None, "threads": None}),
    (5, 8, 4, [0, 1], {"gpu": 1, "cpus": None, "threads": None}),   # job i → GPU i mod n
    (1, 2, 0, [0, 1, 2, 3], {"gpu": None, "cpus": [2, 3], "threads": 2}),
    (0, 3, 0, [0, 1, 2, 3, 4, 5, 6], {"gpu": None, "cpus": [0, 1], "threads": 2}),
    (3, 4, 0, [0, 1], {"gpu": None, "cpus": [1], "threads": 1}),   # more jobs than cores: wrap
])
def test_placement(slot, n_slots, n_gpus, cpus, expected):
    assert placement(slot, n_slots, n_gpus, cpus) == expected


def test_cpu_shares_are_disjoint_and_cover_the_cores():
    cpus = list(range(8))
    shares = [placement(i, 4, 0, cpus)["cpus"] for i in range(4)]
    assert sorted(c for s in shares for c in s) == cpus


def hydra_cfg(*overrides):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_launcher_presets_and_trainer_ddp_compose():
    par = hydra_cfg("hydra/launcher=parallel", "hydra.launcher.n_jobs=4").hydra.launcher
    assert par._target_.endswith("JoblibLauncher") and par.n_jobs == 4
    slurm = hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu").hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher") and slurm.gpus_per_node == 1
    assert slurm.partition == "gpu" and slurm.tasks_per_node == 1
    ddp = hydra_cfg("trainer=ddp").trainer
    assert ddp.strategy.startswith("ddp") and ddp.devices == 2


def test_experiment_presets_fix_their_sweep_dir_for_resuming():
    for name in ("strategy_sweep", "label_budget"):
        cfg = hydra_cfg(f"experiment={name}")
        assert "${now:" not in str(cfg.hydra.sweep.dir) and cfg.hydra.sweeper.params.seed == "0,1,2"
    params = hydra_cfg("experiment=strategy_sweep").hydra.sweeper.params
    assert params.strategy == "glob(*)"  # every strategy YAML, new ones included
    budget = hydra_cfg("experiment=label_budget").hydra.sweeper.params
    assert budget["target.data.samples_per_class"] == "5,10,50,200"


def test_unknown_or_missing_logger_is_one_clear_error(tmp_path):
    from transfer_lab.train import check_overrides

    with pytest.raises(ConfigError, match="logger=wandb: unknown option.*valid: csv, none, tensorboard"):
        check_overrides(["logger=wandb"])
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="logger.tensorboard: .*TensorBoardLogger cannot be built"):
            run(compose_cfg("logger=[csv,tensorboard]", store=tmp_path), tmp_path / "b")
        assert not any(tmp_path.rglob("manifest.json"))  # no source trained first


@pytest.mark.slow
def test_a_bad_cell_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "sweep"
    with pytest.raises(SystemExit) as e:
        multirun(monkeypatch, "target.data.samples_per_class=5,1000,10", "target.epochs=1", "source.epochs=1",
                 f"store_dir={tmp_path}/store", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=${hydra.job.num}")
    assert e.value.code == 1
    cells = results_under(sweep)
    assert {n: r["status"] for n, r in cells.items()} == {"0": "ok", "1": "failed", "2": "ok"}
    assert cells["1"]["stage"] == "config" and "samples_per_class=1000" in cells["1"]["error"]
    assert "\n" not in cells["1"]["error"]
    assert "sweep: 2 ok, 1 failed, 0 skipped" in capsys.readouterr().out


def test_a_sweeper_optimises_the_named_validation_metric_not_the_test_headline():
    from transfer_lab.train import objective

    res = {"metrics": {"val/acc": 0.6, "test/acc": 0.9, "val/loss": 1.2}}
    assert objective(compose_cfg(), res) == 0.9  # optimized_metric unset: the headline
    assert objective(compose_cfg("optimized_metric=val/acc"), res) == 0.6
    with pytest.raises(ConfigError, match="optimized_metric=val/r2"):
        objective(compose_cfg("optimized_metric=val/r2"), res)


def test_cell_dirname_keeps_short_names_and_cuts_long_ones_to_distinct_stable_names():
    from transfer_lab.config import cell_dirname

    assert cell_dirname(3, "seed=0,strategy=lora") == "3_seed=0,strategy=lora"
    long_a = ",".join(f"strategy.k{i}=0.4892741426916107" for i in range(12))
    long_b = long_a.replace("k11=0.48", "k11=0.49")
    a, b = cell_dirname(0, long_a), cell_dirname(0, long_b)
    assert len(a.encode()) <= 200 and a.startswith("0_strategy.k0=") and a != b
    assert cell_dirname(0, long_a) == a  # a re-run finds the same directory


def test_presets_named_by_overrides_cut_long_names_too():
    from pathlib import Path

    import yaml
    from omegaconf import OmegaConf

    from transfer_lab.config import register

    register()
    long = ",".join(f"strategy.k{i}=0.4892741426916107" for i in range(12))
    cfg = OmegaConf.create({"o": long, "short": "seed=0", "d": "${tl_cell_dir:'',${o}}",
                            "s": "${tl_cell_dir:'',${short}}"})
    assert cfg.s == "seed=0"  # no job number: an extended sweep finds its finished cells by name
    assert len(cfg.d.encode()) <= 200 and cfg.d.startswith("strategy.k0=")
    conf = Path(__file__).resolve().parents[1] / "conf"
    for preset in sorted((conf / "experiment").glob("*.yaml")):
        sweep = (yaml.safe_load(preset.read_text()).get("hydra") or {}).get("sweep") or {}
        subdir = str(sweep.get("subdir", ""))
        assert "override_dirname" not in subdir or subdir.startswith("${tl_cell_dir:"), preset.name
