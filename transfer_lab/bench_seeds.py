"""Part (g) of ``python -m transfer_lab.bench``: transfer_lab's per-step overhead over the plain loop,
and K seeds trained as one vectorised model vs one after the other."""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path

import torch

from transfer_lab.bench_common import datasets, framework_cfg, framework_fit, loop_fit, now
from transfer_lab.models import convnet, mlp


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
        mode = seeds[max(seeds)]["mode"]  # K = 1 runs its one seed as a loop
        print(f"(g) {name:8s} overhead {out[name]['overhead_us_per_step']:7.0f} µs/step   vectorised "
              f"seeds ({mode}): " + "   ".join(f"K={k} {r['vectorised_ips']:.0f} vs {r['separate_ips']:.0f} "
                                            f"img/s ({r['speedup']:.2f}×)" for k, r in seeds.items()), flush=True)
    return out


def seeds_summary(res: dict) -> dict:
    """The two headline figures of (g): ``{"mlp": …, "convnet": …}`` each (K = 8 vs 8 runs), and
    ``vectorised_seeds``: per model, ``{K: [vectorised images/s, separate images/s, ratio]}``."""
    g = res.get("g", {})
    return {"overhead_us_per_step": {m: r["overhead_us_per_step"] for m, r in g.items()} or None,
            "vectorised_seeds_speedup": {m: r["seeds"][8]["speedup"] for m, r in g.items()} or None,
            # every K measured: images/s of K seeds as one model vs K separate runs, and their ratio
            "vectorised_seeds": {m: {str(k): [v["vectorised_ips"], v["separate_ips"], v["speedup"]]
                                     for k, v in r["seeds"].items()} for m, r in g.items()} or None}
