"""Student-epoch time with and without the teacher-logit cache, side by side in one process.

    OMP_NUM_THREADS=1 python experiments/distillation/time_cache.py [--repeats 2] [overrides ...]

Composes ``experiment=distillation`` (the MNIST preset) plus the overrides, then runs the
student stage alternately with ``strategy.cache_teacher=true`` and ``false`` (so drift in the
machine's load hits both arms alike) and prints, per arm, the median wall and CPU seconds per
training epoch (Lightning's ``on_train_epoch_start`` → ``on_train_epoch_end``, validation
included) and the one-off cost of filling the cache. The teacher comes from the store (trained
on the first run if absent; its quality does not matter for timing, hence ``source.epochs=1``
by default).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir

from transfer_lab.run import run
from transfer_lab.strategies.distill import Distill

CONF = Path(__file__).resolve().parents[2] / "conf"


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t = (time.perf_counter(), time.process_time())

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.wall.append(time.perf_counter() - self._t[0])
        self.cpu.append(time.process_time() - self._t[1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2, help="runs per arm (alternating)")
    p.add_argument("overrides", nargs="*", default=[])
    args = p.parse_args()
    # whole epochs: the preset's step budgets and best-val selection are switched off
    base = ["experiment=distillation", "source.steps=null", "target.steps=null", "target.val_check_interval=null",
            "target.select=last", "source.epochs=1", "target.epochs=3", "transferability=false",
            "resume=false", "target.save_weights=none", "logger=none",
            "trainer.enable_progress_bar=false", *args.overrides]
    timers: dict[str, list[EpochTimer]] = {"true": [], "false": []}
    fills = []
    callbacks = Distill.callbacks
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(str(CONF), version_base="1.3"):
        for r in range(args.repeats):
            for arm in ("true", "false"):
                timer = EpochTimer()
                Distill.callbacks = lambda self, t=timer: [*callbacks(self), t]  # noqa: B023
                cfg = compose("train", overrides=[*base, f"strategy.cache_teacher={arm}"])
                res = run(cfg, Path(tmp) / f"{arm}{r}")
                timers[arm].append(timer)
                if arm == "true":
                    fills.append(res["strategy_report"]["teacher_cache"]["seconds"])
    n = res["data"]["target"]["n_train"]
    print(f"student epoch on {n} images, median over {args.repeats} runs × epochs:")
    for arm, label in (("false", "no cache (teacher forward per batch)"), ("true", "cached logits")):
        wall = statistics.median(w for t in timers[arm] for w in t.wall)
        cpu = statistics.median(c for t in timers[arm] for c in t.cpu)
        print(f"  {label:38s} wall {wall:6.2f} s   cpu {cpu:6.2f} s")
        timers[arm] = [wall, cpu]
    print(f"  speed-up (wall) {timers['false'][0] / timers['true'][0]:.2f}×; "
          f"filling the cache once: {statistics.median(fills):.2f} s")


if __name__ == "__main__":
    main()
