"""``python -m transfer_lab.bench``: is transfer_lab as fast as a hand-written loop?

Prints (a) training images/s through transfer_lab (TransferModule + Lightning Trainer + the data
module, configured by ``conf/trainer/<--trainer>.yaml``) vs a plain PyTorch loop doing the same
work, (b) images/s of the in-memory data path vs the torchvision PIL ``Dataset`` + ``DataLoader``,
(c) wall time of the quickstart run with a cold vs a warm source store (in-process),
(d) peak resident memory of one quickstart run process, (e) process start-up to its first
training step. The machine may be shared: each ratio comes from repetitions taken side by
side and alternated in one process, and is reported as a median. ``--json`` prints one JSON
object as the last line. The same command runs on a GPU (``--device auto`` picks it).
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback

from transfer_lab.data import EmbeddedMNIST, NpzData, TransferDataModule
from transfer_lab.data.loader import random_crop
from transfer_lab.models import convnet, mlp, resnet_cifar
from transfer_lab.module import TransferModule
from transfer_lab.perf import ChannelsLast, Compile
from transfer_lab.builders import make_trainer
from transfer_lab.run import run
from transfer_lab.strategies.scratch import Scratch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TRANSFER_LAB_DATA") or ROOT / "data")  # as conf/train.yaml's data_dir
AMP = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# what (a)-(c) time with; main() picks it (see --clock)
now: Callable[[], float] = time.perf_counter


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


# --- data and models ---------------------------------------------------------------------------
def datasets(per_class: int, seed: int = 0) -> dict[str, tuple[TransferDataModule, Callable]]:
    """MNIST-size for the small CNN, CIFAR-size for resnet_cifar (real arrays; mnist5k fallback)."""
    kw = dict(samples_per_class=per_class, seed=seed, batch_size=64)
    if (DATA / "mnist_train.npz").is_file():
        mnist = NpzData(str(DATA / "mnist_train.npz"), str(DATA / "mnist_test.npz"), **kw)
    else:
        mnist = EmbeddedMNIST(**{**kw, "samples_per_class": min(per_class, 360)})
    out = {"convnet/mnist": (mnist.prepare(), convnet)}
    if (DATA / "cifar10_jpeg_train20k.npz").is_file():
        cifar = NpzData(str(DATA / "cifar10_jpeg_train20k.npz"), str(DATA / "cifar10_jpeg_test.npz"),
                        hflip=True, augment="crop_flip", **{**kw, "samples_per_class": per_class // 4})
        out["resnet_cifar/cifar10"] = (cifar.prepare(), partial(resnet_cifar, depth=20))
    return out


def make_model(factory: Callable, dm: TransferDataModule) -> torch.nn.Module:
    torch.manual_seed(0)  # both contestants start from the same weights
    c, _, s = dm.input_shape
    return factory(in_channels=c, image_size=s, num_classes=dm.num_classes)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- (a) framework vs hand-written loop ----------------------------------------------------------
def framework_fit(cfg, dm: TransferDataModule, factory: Callable, out: Path, args) -> float:
    """Seconds for ``epochs`` epochs through TransferModule + Trainer (construction included)."""
    module = TransferModule(make_model(factory, dm), Scratch(), partial(torch.optim.Adam, lr=1e-3),
                            lr=1e-3, num_classes=dm.num_classes)
    t0 = now()
    extra = ([ChannelsLast()] if args.channels_last else []) + ([Compile()] if args.compile else [])
    trainer = make_trainer(cfg, "target", out, extra)
    trainer.fit(module, datamodule=dm)
    sync(trainer.strategy.root_device)
    return now() - t0


def loop_fit(dm: TransferDataModule, factory: Callable, device: torch.device, args) -> float:
    """The same work as a researcher's own loop: device-resident uint8, normalise, step."""
    model = make_model(factory, dm)
    t0 = now()
    model = model.to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if args.compile:
        model.compile()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "16-mixed")
    x_all, y_all = dm.x_train.to(device), dm.y_train.to(device)
    mean, std = dm.mean.to(device).view(1, -1, 1, 1), dm.std.to(device).view(1, -1, 1, 1)
    pad, flip = max(1, x_all.shape[-1] // 8), dm.augment == "crop_flip" and dm.allows_hflip()
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(args.epochs):
        loss_sum, correct = torch.zeros((), device=device), torch.zeros((), device=device)
        perm = torch.randperm(len(y_all), generator=gen).to(device)
        for idx in perm.split(dm.batch_size):
            x, y = x_all[idx], y_all[idx]
            if dm.augment != "none":  # the same batched kernels the data module uses
                x = random_crop(x, pad, flip=flip)
            x = ((x.float() / 255 - mean) / std).contiguous(memory_format=fmt)
            with torch.autocast(device.type, dtype=AMP.get(args.precision), enabled=args.precision in AMP):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach() * len(y)  # epoch metrics kept on the device, read once
            correct += (logits.argmax(1) == y).sum()
        _ = (loss_sum / len(y_all)).item(), (correct / len(y_all)).item()
    sync(device)
    return now() - t0


def framework_cfg(args, device: torch.device):
    """The project's trainer config (``--trainer``), no validation: the plain loop has none."""
    over = [f"trainer={args.trainer}", "trainer.enable_progress_bar=false", f"target.epochs={args.epochs}",
            f"trainer.precision={args.precision}", "+trainer.limit_val_batches=0",
            f"trainer.accelerator={'gpu' if device.type == 'cuda' else 'cpu'}"]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=over)


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
        for rep in range(args.reps):  # alternate who goes first: the machine's load drifts
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


# --- (g) per-step overhead over the plain loop; K seeds as one vectorised model ------------------
def bench_seeds(args, device: torch.device, work: Path) -> dict:
    """(g) For the issue's overhead-bound MLP 784-16-10 and ``convnet`` (MNIST, batch 64): the µs
    per optimizer step transfer_lab spends over the plain loop (median of paired, alternated
    runs; the Trainer's construction included), and images/s of K seeds trained as one
    vectorised model vs the same K seeds one after the other (MNIST-shaped synthetic images:
    throughput does not depend on pixel values; 100 per class and seed)."""
    from transfer_lab.vectorized.bench import seeds_throughput, synthetic_mnist

    cfg = framework_cfg(args, device)
    dm = datasets(args.per_class)["convnet/mnist"][0]
    steps = args.epochs * -(-len(dm.y_train) // dm.batch_size)
    out = {}
    # the models the seed groups train (MODELS): the MLP 784-16-10 and convnet
    for name, factory in {"mlp": partial(mlp, hidden=(16,)), "convnet": convnet}.items():
        framework_fit(cfg, dm, factory, work / "warmup", args)  # first-call costs, both sides
        loop_fit(dm, factory, device, args)
        extra = []
        for rep in range(args.reps):  # alternate who goes first: the machine's load drifts
            s = {}
            for side in ("framework", "loop")[::1 if rep % 2 == 0 else -1]:
                s[side] = (framework_fit(cfg, dm, factory, work / name, args) if side == "framework"
                           else loop_fit(dm, factory, device, args))
            extra.append((s["framework"] - s["loop"]) / steps * 1e6)
        seeds = seeds_throughput(name, ks=(1, 4, 8, 16), epochs=args.epochs, device=device.type,
                                 repeats=args.reps, data=partial(synthetic_mnist, n_per_class=100),
                                 clock=now)
        out[name] = {"overhead_us_per_step": statistics.median(extra), "overheads": extra,
                     "steps": steps, "seeds": seeds}
        print(f"(g) {name:8s} overhead {out[name]['overhead_us_per_step']:7.0f} µs/step   vectorised "
              f"seeds: " + "   ".join(f"K={k} {r['vectorised_ips']:.0f} vs {r['separate_ips']:.0f} img/s "
                                     f"({r['speedup']:.2f}×)" for k, r in seeds.items()), flush=True)
    return out


def seeds_summary(res: dict) -> dict:
    """The two headline figures of (g): ``{"mlp": …, "convnet": …}`` each (K = 8 vs 8 runs)."""
    g = res.get("g", {})
    return {"overhead_us_per_step": {m: r["overhead_us_per_step"] for m, r in g.items()} or None,
            "vectorised_seeds_speedup": {m: r["seeds"][8]["speedup"] for m, r in g.items()} or None}


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


# --- (c) cold vs warm source store; (d, e) one run as its own process ---------------------------
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
               f"+callbacks.first_step_stamp={{_target_:transfer_lab.bench.FirstStepStamp,path:'{stamp}'}}"]
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="transfer-lab-bench", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.add_argument("--parts", default="abcdeg", help="which figures to measure: subset of abcdefg "
                   "(f: speed-up of each performance option through transfer_lab; not in the default; "
                   "g: per-step overhead and vectorised seeds)")
    p.add_argument("--reps", type=int, default=3, help="alternated repetitions per figure (median)")
    p.add_argument("--epochs", type=int, default=2, help="training epochs per (a) measurement")
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
    global now
    cpu_clock = args.clock == "cpu" or (args.clock == "auto" and device.type == "cpu"
                                        and torch.get_num_threads() == 1 and args.pil_workers == 0)
    now = time.process_time if cpu_clock else time.perf_counter
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
