"""``python -m transfer_lab.bench``: is transfer_lab as fast as a hand-written loop?

Prints (a) training images/s through transfer_lab (TransferModule + Lightning Trainer + the data
module, configured by ``conf/trainer/<--trainer>.yaml``) vs a plain PyTorch loop doing the same
work, (b) images/s of the in-memory data path vs the torchvision PIL ``Dataset`` + ``DataLoader``,
(c) wall time of the quickstart run with a cold vs a warm source store (in-process),
(d) peak resident memory of one quickstart run process, (e) process start-up to its first
training step. The machine may be shared: each ratio comes from repetitions taken side by
side and alternated in one process, and is reported as a median. ``--json`` prints one JSON
object as the last line. The same command runs on a GPU (``--device auto`` picks it).

The shared pieces live in ``bench_common`` (clock, datasets, the two contestants), (d, e) in
``bench_process`` and (g) in ``bench_seeds``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from transfer_lab.bench_common import (AMP, ROOT, datasets, framework_cfg, framework_fit, loop_fit, now,
                                       set_clock, sync)
from transfer_lab.bench_process import bench_process
from transfer_lab.bench_seeds import bench_seeds, seeds_summary
from transfer_lab.data import TransferDataModule
from transfer_lab.run import run


# --- (a) framework vs hand-written loop; (f) each performance option ---------------------------

def bench_options(args, device: torch.device, work: Path) -> dict:
    """(f) Training images/s through transfer_lab with each performance option vs without."""
    variants = {"baseline": {}, "channels_last": {"channels_last": True},
                "bf16-mixed": {"precision": "bf16-mixed"}, "compile": {"compile": True}}
    out = {}
    for name, (dm, factory) in datasets(args.per_class).items():
        n = args.epochs * len(dm.y_train)
        ips: dict[str, list[float]] = {v: [] for v in variants}
        for rep in range(args.reps):
            order = list(variants)[rep % len(variants):] + list(variants)[:rep % len(variants)]
            for v in order:
                a = argparse.Namespace(**{**vars(args), **variants[v]})
                ips[v].append(n / framework_fit(framework_cfg(a, device), dm, factory, work / name, a))
        base = statistics.median(ips["baseline"])
        out[name] = {v: {"ips": statistics.median(x), "speedup": statistics.median(x) / base}
                     for v, x in ips.items()}
        print(f"(f) {name:22s} " + "   ".join(f"{v} {r['ips']:.0f} img/s ({r['speedup']:.2f}×)"
                                              for v, r in out[name].items()), flush=True)
    return out


def bench_framework(args, device: torch.device, work: Path) -> dict:
    cfg = framework_cfg(args, device)
    out = {}
    for name, (dm, factory) in datasets(args.per_class).items():
        n = args.epochs * len(dm.y_train)
        framework_fit(cfg, dm, factory, work / "warmup", args)  # first-call costs, both sides
        loop_fit(dm, factory, device, args)
        fw, lp = [], []
        for rep in range(args.reps_a):  # alternate who goes first: the machine's load drifts
            pair = [lambda: fw.append(n / framework_fit(cfg, dm, factory, work / name, args)),
                    lambda: lp.append(n / loop_fit(dm, factory, device, args))]
            for f in pair if rep % 2 == 0 else pair[::-1]:
                f()
        ratios = [a / b for a, b in zip(fw, lp)]
        out[name] = {"framework_ips": statistics.median(fw), "loop_ips": statistics.median(lp),
                     "ratio": statistics.median(ratios), "ratios": ratios,
                     "images": n, "batch_size": dm.batch_size, "input": list(dm.input_shape)}
        print(f"(a) {name:22s} transfer_lab {out[name]['framework_ips']:8.0f} img/s   plain loop "
              f"{out[name]['loop_ips']:8.0f} img/s   ratio {out[name]['ratio']:.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    return out


# --- (b) in-memory data path vs torchvision PIL pipeline -----------------------------------------
def iterate(dm: TransferDataModule, device: torch.device, epochs: int) -> float:
    """Images/s of ``epochs`` training epochs of data alone: batches ready for the model."""
    t0 = now()
    n = 0
    for _ in range(epochs):
        for x, y in dm.train_dataloader():
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if dm.loader == "memory":
                x = dm.transform(x, train=True)
            n += len(y)
    sync(device)
    return n / (now() - t0)


def bench_data(args, device: torch.device) -> dict:
    out = {}
    for name, (dm, _) in datasets(args.per_class).items():
        name = name.split("/")[1]
        for attr in ("x_train", "y_train"):  # what setup() does under a Trainer: device-resident
            setattr(dm, attr, getattr(dm, attr).to(device))
        mem, pil = [], []
        for rep in range(args.reps):
            for loader in ("memory", "torchvision") if rep % 2 == 0 else ("torchvision", "memory"):
                dm.loader, dm.num_workers = loader, args.pil_workers
                # the fast path is ~100× quicker: more epochs for a measurable wall time
                ips = iterate(dm, device, 20 if loader == "memory" else 1)
                (mem if loader == "memory" else pil).append(ips)
        ratios = [a / b for a, b in zip(mem, pil)]
        out[name] = {"memory_ips": statistics.median(mem), "pil_ips": statistics.median(pil),
                     "ratio": statistics.median(ratios), "ratios": ratios, "augment": dm.augment,
                     "pil_workers": args.pil_workers}
        print(f"(b) {name:22s} in-memory {out[name]['memory_ips']:10.0f} img/s   PIL DataLoader "
              f"{out[name]['pil_ips']:8.0f} img/s   ratio {out[name]['ratio']:.1f}× "
              f"(augment={dm.augment}, workers={args.pil_workers})", flush=True)
    return out


# --- (c) cold vs warm source store --------------------------------------------------------------
def quickstart_cfg(store: Path, device: torch.device, *extra: str):
    over = ["experiment=quickstart", "trainer.enable_progress_bar=false", f"store_dir={store}",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}", *extra]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=over)


def bench_store(args, device: torch.device, work: Path) -> dict:
    """In-process ``run.run`` of the quickstart task: fresh store (cold) vs a filled one (warm)."""
    warm_store = work / "store_cold0"  # filled by the first cold run, then reused warm
    cold, warm = [], []
    for rep in range(args.reps):
        jobs = [("cold", work / f"store_cold{rep}", cold), ("warm", warm_store, warm)]
        for kind, store, acc in jobs if rep % 2 == 0 else jobs[::-1]:
            t0 = now()
            res = run(quickstart_cfg(store, device), work / f"q_{kind}{rep}")
            acc.append(now() - t0)
            assert res["source"]["cache_hit"] is (kind == "warm"), res["source"]
    ratios = [w / c for w, c in zip(warm, cold)]
    out = {"cold_s": statistics.median(cold), "warm_s": statistics.median(warm),
           "ratio": statistics.median(ratios), "ratios": ratios, "store": str(warm_store)}
    print(f"(c) quickstart run        cold store {out['cold_s']:6.2f} s   warm store {out['warm_s']:6.2f} s"
          f"   ratio {out['ratio']:.3f} ({', '.join(f'{r:.3f}' for r in ratios)})", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="transfer-lab-bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--parts", default="abcdeg", help="which figures to measure: subset of abcdefg "
                   "(f: speed-up of each performance option through transfer_lab; not in the default; "
                   "g: per-step overhead and vectorised seeds)")
    p.add_argument("--reps", type=int, default=3, help="alternated repetitions per figure (median)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per (a) measurement")
    p.add_argument("--reps-a", type=int, default=7,
                   help="alternated framework/loop pairs of (a) (median ratio): single pairs spread "
                        "±5–10%% on a shared VM, so its headline ratio needs more than --reps")
    p.add_argument("--per-class", type=int, default=400,
                   help="(a, b) MNIST images per class (CIFAR: a quarter of it)")
    p.add_argument("--trainer", default="default", help="conf/trainer/<name>.yaml for the framework side")
    p.add_argument("--precision", default="32-true", choices=["32-true", *AMP])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--pil-workers", type=int, default=0, help="DataLoader workers of the PIL path")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--clock", default="auto", choices=["auto", "wall", "cpu"],
                   help="time (a)-(c) by wall clock or by this process's CPU time; auto: CPU time "
                        "on a CPU device with one thread and no loader workers (a shared machine's "
                        "load then barely moves the figures), wall clock otherwise (GPU)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's choice); 1 on an oversubscribed "
                        "machine, where OpenMP barriers wait on descheduled threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the (d, e) child processes too
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu"
                                        and torch.get_num_threads() == 1 and args.pil_workers == 0)
    set_clock(time.process_time if cpu_clock else time.perf_counter)
    for name in ("lightning.pytorch", "lightning.fabric", "transfer_lab"):
        logging.getLogger(name).setLevel(logging.WARNING)
    print(f"transfer_lab bench: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), lightning {L.__version__}, "
          f"device {device}, precision {args.precision}, channels_last {args.channels_last}, "
          f"compile {args.compile}, reps {args.reps}, clock {'process CPU time' if cpu_clock else 'wall'}",
          flush=True)
    res: dict = {"device": str(device), "torch": torch.__version__, "args": vars(args),
                 "clock": "cpu" if cpu_clock else "wall"}
    with tempfile.TemporaryDirectory(prefix="tl_bench_") as tmp:
        work = Path(tmp)
        if "a" in args.parts:
            res["a"] = bench_framework(args, device, work)
        if "b" in args.parts:
            res["b"] = bench_data(args, device)
        if "c" in args.parts or "d" in args.parts or "e" in args.parts:
            res["c"] = bench_store(args, device, work)
        if "f" in args.parts:
            res["f"] = bench_options(args, device, work)
        if "d" in args.parts or "e" in args.parts:
            res["de"] = bench_process(args, device, Path(res["c"]["store"]), work)
        if "g" in args.parts:
            res["g"] = bench_seeds(args, device, work)
        if "h" in args.parts:  # the cost of a tuning trial (bench_process; not in the default parts)
            from transfer_lab.bench_process import bench_trials
            res["h"] = bench_trials(args, device, work)
    summary = {
        "framework_vs_loop": min((v["ratio"] for v in res.get("a", {}).values()), default=None),
        "data_path_vs_pil": min((v["ratio"] for v in res.get("b", {}).values()), default=None),
        "warm_vs_cold": res.get("c", {}).get("ratio"),
        "peak_rss_mb": res.get("de", {}).get("peak_rss_mb"),
        "startup_s": res.get("de", {}).get("startup_s"),
        "bench_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **seeds_summary(res),
        "detail": res}
    if args.json:
        print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
