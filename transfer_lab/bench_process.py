"""Parts (d) and (e) of ``python -m transfer_lab.bench``: one quickstart run as its own process,
its start-up to the first training step and its peak resident memory, against the bare imports."""

from __future__ import annotations

import atexit
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from transfer_lab.bench_common import ROOT


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
