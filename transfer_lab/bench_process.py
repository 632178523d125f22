"""Parts (d), (e) and (h) of ``python -m transfer_lab.bench``: one quickstart run as its own
process, its start-up to the first training step and its peak resident memory, against the bare
imports; (h) the cost of a tuning trial: a process's start-up and imports, the data preparation
of a first and of a later trial (in-process), and the overhead of each trial (its wall time minus
its training steps) of an Optuna study run in one process, with and without reusing the data."""

from __future__ import annotations

import atexit
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from transfer_lab import bench_common
from transfer_lab.bench_common import ROOT, now


class FirstStepStamp(Callback):
    """Start-up probe: writes ``time.time()`` to ``path`` when the first training batch starts,
    and the process's peak resident memory (VmHWM, per process image) when it exits."""

    def __init__(self, path: str) -> None:
        self.path, self.done = Path(path), False
        atexit.register(self._peak)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.done:
            self.path.write_text(f"first_step {time.time()!r}\n")
            self.done = True

    def _peak(self) -> None:
        status = Path("/proc/self/status")
        kb = [ln.split()[1] for ln in status.read_text().splitlines() if ln.startswith("VmHWM")] \
            if status.exists() else [str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)]
        with self.path.open("a") as f:
            f.write(f"peak_rss_mb {int(kb[0]) / 1024}\n")


FLOOR = ("import torch, lightning, hydra, pathlib; print([l.split()[1] for l in pathlib.Path("
         "'/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')][0])")


def spawn(cmd: list[str], err: Path) -> tuple[float, str]:
    """Wall seconds and stdout of a child process; raises with its stderr tail when it fails."""
    t0 = time.time()
    with open(err, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=f, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed ({proc.returncode}): {err.read_text()[-800:]}")
    return time.time() - t0, proc.stdout


def bench_process(args, device: torch.device, store: Path, work: Path) -> dict:
    """``python -m transfer_lab.train experiment=quickstart`` as a child (warm store): time from
    spawning it to its first training step, and its peak resident memory; alternated with the
    floor every such process pays, ``python -c "import torch, lightning, hydra"``."""
    start, rss, floor, floor_rss = [], [], [], []

    def bare() -> None:
        wall, out = spawn([sys.executable, "-c", FLOOR], work / "floor.err")
        floor.append(wall)
        floor_rss.append(int(out.split()[-1]) / 1024)
    for rep in range(args.reps):
        if rep % 2 == 1:
            bare()
        stamp, errs = work / f"stamp{rep}", work / f"child{rep}.err"
        cmd = [sys.executable, "-m", "transfer_lab.train", "experiment=quickstart", f"store_dir={store}",
               f"hydra.run.dir={work / f'child{rep}'}", "trainer.enable_progress_bar=false",
               f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}",
               f"+callbacks.first_step_stamp={{_target_:transfer_lab.bench_process.FirstStepStamp,path:'{stamp}'}}"]
        t0 = time.time()
        spawn(cmd, errs)
        probe = dict(ln.split() for ln in stamp.read_text().splitlines())
        start.append(float(probe["first_step"]) - t0)
        rss.append(float(probe["peak_rss_mb"]))
        if rep % 2 == 0:
            bare()
    out = {"startup_s": statistics.median(start), "startups": start, "import_floor_s": statistics.median(floor),
           "import_floor_rss_mb": statistics.median(floor_rss),
           "peak_rss_mb": statistics.median(rss), "rss_mb": rss}
    print(f"(d) peak RSS of one quickstart run process {out['peak_rss_mb']:.0f} MB (bare imports: "
          f"{out['import_floor_rss_mb']:.0f} MB)   "
          f"(this benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB)")
    print(f"(e) start-up to first training step {out['startup_s']:.2f} s "
          f"({', '.join(f'{s:.2f}' for s in start)}); bare `import torch, lightning, hydra` "
          f"{out['import_floor_s']:.2f} s", flush=True)
    return out


# --- (h) the cost of a trial ------------------------------------------------------------------
def child_clock() -> float:
    """The studies' probes' clock: this process's CPU time when the benchmark times by CPU time
    (``TRANSFER_LAB_BENCH_CLOCK=cpu``, set by the parent: a shared machine's load then barely
    moves the figures), else the wall clock."""
    return time.process_time() if os.environ.get("TRANSFER_LAB_BENCH_CLOCK") == "cpu" else time.time()


def cpu_clock() -> bool:
    return bench_common._clock is time.process_time


class TrialSteps(Callback):
    """Study probe: appends ``steps <s> <n>`` (the training batches' time, start to end of each
    batch: forward, backward, optimizer) and ``eval <s>`` (validation and test loops) per fit."""

    def __init__(self, path: str) -> None:
        self.path, self.steps, self.n, self.eval, self.t0 = Path(path), 0.0, 0, 0.0, 0.0

    def on_train_batch_start(self, *args) -> None:
        self.t0 = child_clock()

    def on_train_batch_end(self, *args) -> None:
        self.steps, self.n = self.steps + child_clock() - self.t0, self.n + 1

    def on_validation_epoch_start(self, *args) -> None:
        self.t0 = child_clock()

    def on_validation_epoch_end(self, *args) -> None:
        self.eval += child_clock() - self.t0

    on_test_epoch_start, on_test_epoch_end = on_validation_epoch_start, on_validation_epoch_end

    def on_train_end(self, *args) -> None:
        with self.path.open("a") as f:
            f.write(f"steps {self.steps!r} {self.n}\n")

    def on_test_end(self, *args) -> None:
        with self.path.open("a") as f:
            f.write(f"eval {self.eval!r}\n")


class TrialClock:
    """Hydra callback (``hydra.callbacks``): the time each job (trial) of a multirun ends."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _stamp(self, event: str) -> None:
        with self.path.open("a") as f:
            f.write(f"{event} {child_clock()!r}\n")

    def on_multirun_start(self, config, **kwargs) -> None:
        self._stamp("multirun_start")

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        self._stamp("job_end")


IMPORTS = "import transfer_lab.train, transfer_lab.run"  # what a trial's process imports to run it


def child_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def bench_startup(args, work: Path) -> dict:
    """A trial in a process of its own pays this first: the interpreter, then the imports (CPU
    time of the children, or their wall time, as the benchmark's clock)."""
    bare, imports = [], []
    for rep in range(args.reps):
        for code, acc in [("pass", bare), (IMPORTS, imports)][::1 if rep % 2 == 0 else -1]:
            cpu0 = child_cpu()
            wall = spawn([sys.executable, "-c", code], work / "startup.err")[0]
            acc.append(child_cpu() - cpu0 if cpu_clock() else wall)
    return {"python_s": statistics.median(bare), "imports_s": statistics.median(imports) - statistics.median(bare)}


def study_cfg(store: Path, *extra: str):
    from hydra import compose, initialize_config_dir

    over = ["experiment=quickstart", "strategy=linear_probe", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu", f"store_dir={store}", *extra]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=over)


def bench_prepare(args, store: Path) -> dict:
    """``run.prepare`` of a quickstart trial (validation, both data modules, the seeded build):
    with the data prepared afresh (a first trial) vs reused (a later trial of the same process)."""
    from transfer_lab.data import prepared_cache
    from transfer_lab.run import prepare

    cfg = study_cfg(store)
    first, later = [], []
    for rep in range(args.reps):
        for kind in ("first", "later") if rep % 2 == 0 else ("later", "first"):
            if kind == "first":
                prepared_cache.clear()
            elif not prepared_cache._entries:
                prepare(cfg)  # the earlier trial whose data a later one reuses
            t0 = now()
            prepare(cfg)
            (first if kind == "first" else later).append(now() - t0)
    prepared_cache.clear()
    return {"first_s": statistics.median(first), "later_s": statistics.median(later),
            "saved_s": statistics.median(first) - statistics.median(later), "firsts": first, "laters": later}


N_TRIALS, STEPS = 6, 20  # a study of short trials: what is not training shows


def run_study(store: Path, out: Path, reuse: bool) -> dict:
    """``train -m ... hparams_search=linear_probe`` as a child: per trial, its wall time (from the
    end of the one before; the first from the start of the multirun), its training steps, its
    validation and test loops and its ``prepare_s``; and the process's start-up to the multirun."""
    log = out.with_suffix(".log")
    probe = lambda cls: f"{{_target_:transfer_lab.bench_process.{cls},path:'{log}'}}"  # noqa: E731
    cmd = [sys.executable, "-m", "transfer_lab.train", "-m", "experiment=quickstart", "strategy=linear_probe",
           "hparams_search=linear_probe", f"hydra.sweeper.n_trials={N_TRIALS}", f"target.steps={STEPS}",
           f"store_dir={store}", f"hydra.sweep.dir={out}", "hydra.sweep.subdir=${hydra.job.num}",
           "trainer.enable_progress_bar=false",
           "trainer.accelerator=cpu", "+callbacks.trial_steps=" + probe("TrialSteps"),
           "+hydra.callbacks.trial_clock=" + probe("TrialClock")]
    env = {**os.environ, "TRANSFER_LAB_DATA_CACHE_MB": os.environ.get("TRANSFER_LAB_DATA_CACHE_MB", "1024")
           if reuse else "0", "TRANSFER_LAB_BENCH_CLOCK": "cpu" if cpu_clock() else "wall"}
    t0 = 0.0 if cpu_clock() else time.time()  # CPU time: the child's own, counted from its start
    with open(out.with_suffix(".err"), "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=f, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"study failed ({proc.returncode}): {out.with_suffix('.err').read_text()[-800:]}")
    events = [ln.split() for ln in log.read_text().splitlines()]
    start = next(float(e[1]) for e in events if e[0] == "multirun_start")
    ends = [float(e[1]) for e in events if e[0] == "job_end"]
    steps = [float(e[1]) for e in events if e[0] == "steps"]
    evals = [float(e[1]) for e in events if e[0] == "eval"]
    trials = [b - a for a, b in zip([start, *ends], ends)]
    cells = sorted(out.glob("*/results.json"), key=lambda p: int(p.parent.name))
    prep = [json.loads(p.read_text())["timings"]["prepare_s"] for p in cells]
    assert len(trials) == len(steps) == len(prep) == N_TRIALS, (len(trials), len(steps), len(prep))
    return {"startup_s": start - t0, "trial_s": trials, "steps_s": steps, "eval_s": evals,
            "prepare_wall_s": prep, "overhead_s": [t - s for t, s in zip(trials, steps)]}


def bench_trials(args, device: torch.device, work: Path) -> dict:
    """(h) The cost of a tuning trial beside its training: start-up and imports (a process per
    trial would pay them each time), ``prepare`` first vs reused (in-process), and an Optuna
    study of ``N_TRIALS`` trials of ``STEPS`` steps in one process, reusing the data or not
    (alternated, ``--reps`` each). Timed by the benchmark's clock: with ``--clock cpu`` each
    child's own CPU time."""
    from transfer_lab.run import run

    store = work / "store_trials"
    run(study_cfg(store, "target.steps=1", "target.select=last"), work / "trials_warm")  # source in the store
    out = {"n_trials": N_TRIALS, "steps": STEPS, "startup": bench_startup(args, work),
           "prepare": bench_prepare(args, store)}
    studies: dict[bool, list[dict]] = {True: [], False: []}
    for rep in range(args.reps):
        for reuse in (True, False) if rep % 2 == 0 else (False, True):
            studies[reuse].append(run_study(store, work / f"study_{'on' if reuse else 'off'}{rep}", reuse))

    def later(st: dict, key: str) -> float:  # trials 2..N: the ones that can reuse
        return statistics.median(v for s in st for v in s[key][1:])
    for reuse, st in studies.items():
        out["reuse" if reuse else "no_reuse"] = {
            "overhead_s": later(st, "overhead_s"), "trial_s": later(st, "trial_s"), "steps_s": later(st, "steps_s"),
            "eval_s": later(st, "eval_s"), "prepare_wall_s": later(st, "prepare_wall_s"),
            "first_overhead_s": statistics.median(s["overhead_s"][0] for s in st),
            "startup_s": statistics.median(s["startup_s"] for s in st), "studies": st}
    on, off = out["reuse"], out["no_reuse"]
    # side by side: the studies of one repetition ran back to back
    ratios = [statistics.median(a["overhead_s"][1:]) / statistics.median(b["overhead_s"][1:])
              for a, b in zip(on["studies"], off["studies"])]
    out.update(overhead_ratio=statistics.median(ratios), overhead_ratios=ratios,
               clock="cpu" if cpu_clock() else "wall")
    su, pr = out["startup"], out["prepare"]
    print(f"(h) a trial: python start {su['python_s']:.2f} s + imports {su['imports_s']:.2f} s (own process); "
          f"prepare first {pr['first_s']:.3f} s, reused {pr['later_s']:.3f} s (in-process)", flush=True)
    print(f"(h) study of {N_TRIALS} trials × {STEPS} steps in one process, trials 2-{N_TRIALS}: a trial "
          f"{on['trial_s']:.2f} s reusing data vs {off['trial_s']:.2f} s not, of which training steps "
          f"{on['steps_s']:.2f} vs {off['steps_s']:.2f} s; overhead (trial − steps) {on['overhead_s']:.2f} vs "
          f"{off['overhead_s']:.2f} s (ratio {out['overhead_ratio']:.2f}; validation+test "
          f"{on['eval_s']:.2f} s of it); first trial overhead {on['first_overhead_s']:.2f} s, process "
          f"start-up to the study {on['startup_s']:.2f} s", flush=True)
    return out
