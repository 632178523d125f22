"""Why a transfer worked: ``python -m transfer_lab.analyze`` (console script ``transfer-lab-analyze``).

    analyze RUN_DIR...              per run: layer-by-layer linear CKA (source × target), relative
                                    weight drift, accuracy / balanced / per-class accuracy →
                                    <run>/analysis/{analysis.json,cka.png,drift.png}; with several
                                    runs, a mean ± std table per group (and --figure: one summary PNG)
    analyze --metrics DIR...        accuracy, balanced and per-class accuracy from saved weights
    analyze --rank DIR...           LogME / LEEP of each run's source on its target training set vs
                                    the accuracy reached; Kendall's τ per seed and on seed means
    analyze --transferability RUN   LogME / LEEP of one run's source (no trained weights needed)

A directory that is not itself a run is searched for runs (every ``results.json`` with status ok).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from transfer_lab.errors import ConfigError
from transfer_lab.io import atomic_write_text


def probe_set(dm, n: int, seed: int = 0) -> torch.Tensor:
    """A fixed, seeded subset of the target test images, normalised (test sets may be sorted)."""
    dm.prepare()
    idx = torch.randperm(len(dm.y_test), generator=torch.Generator().manual_seed(seed))[:n]
    return dm.transform(dm.x_test[idx.to(dm.x_test.device)], train=False)


def with_source_bn_stats(target: torch.nn.Module, source: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of ``target`` whose BatchNorm running statistics are the source's (same paths and
    shapes); None when no BatchNorm layer matches."""
    import copy

    from torch.nn.modules.batchnorm import _BatchNorm

    src = {n: m for n, m in source.named_modules() if isinstance(m, _BatchNorm)}
    out = copy.deepcopy(target)
    swapped = 0
    for name, m in out.named_modules():
        s = src.get(name)
        if isinstance(m, _BatchNorm) and s is not None and m.running_mean is not None \
                and s.running_mean is not None and s.running_mean.shape == m.running_mean.shape:
            m.running_mean.copy_(s.running_mean)
            m.running_var.copy_(s.running_var)
            swapped += 1
    return out.eval() if swapped else None


def analyze_run(run_dir: str | Path, store: str | None = None, probe: int = 500,
                source_layers: list[str] | None = None, target_layers: list[str] | None = None,
                figures: bool = True) -> dict[str, Any]:
    """CKA, drift and class metrics of one finished run; written to ``<run>/analysis/``."""
    from transfer_lab.analysis import (class_metrics, cka_matrix, default_layers, layer_features,
                                       linear_cka, predict, relative_drift)
    from transfer_lab.analysis.plots import save_run_figures
    from transfer_lab.analysis.runs import load_run
    from transfer_lab.strategies.common import match_modules

    run = load_run(run_dir, store)
    dm = run.target_dm
    out: dict[str, Any] = {"run_dir": str(run_dir), "strategy": run.results["strategy"],
                           "seed": run.results["seed"],
                           "metrics": class_metrics(*predict(run.target, dm), dm.num_classes)}
    src = run.source
    if src is not None and tuple(src.input_shape) == tuple(dm.input_shape):
        sp = match_modules(src, source_layers, "--source-layers") if source_layers else default_layers(src)
        tp = match_modules(run.target, target_layers, "--target-layers") if target_layers \
            else default_layers(run.target)
        x = probe_set(dm, probe)
        fs, ft = layer_features(src, x, sp), layer_features(run.target, x, tp)
        matrix = cka_matrix([fs[p] for p in sp], [ft[p] for p in tp])
        out["cka"] = {"probe": len(x), "source_layers": sp, "target_layers": tp, "matrix": matrix,
                      "diagonal": {p: matrix[sp.index(p)][tp.index(p)] for p in tp if p in sp}}
        # the head is re-initialised by every transfer strategy: its "drift" would mean nothing
        # Control: the target's weights with the source's BatchNorm statistics. Where CKA recovers,
        # the representation moved because BN re-estimated its statistics, not because weights did.
        swapped = with_source_bn_stats(run.target, src)
        if swapped is not None:
            fw = layer_features(swapped, x, tp)
            out["cka"]["diagonal_source_bn_stats"] = {p: linear_cka(fs[p], fw[p]) for p in tp if p in sp}
        blocks = [p for p in tp if p != "head"]
        out["drift"] = relative_drift(src, run.target, blocks)
        out["bn_stats_drift"] = relative_drift(src, run.target, blocks, buffers=True)
    elif src is not None:
        out["note"] = f"source input {tuple(src.input_shape)} ≠ target data {tuple(dm.input_shape)}: no CKA"
    dest = Path(run_dir) / "analysis"
    dest.mkdir(parents=True, exist_ok=True)
    if figures:
        out["figures"] = save_run_figures(out, dest)
    atomic_write_text(dest / "analysis.json", json.dumps(out, indent=1))
    return out


def run_metrics(run_dir: Path, store: str | None) -> dict:
    from transfer_lab.analysis import class_metrics, predict
    from transfer_lab.analysis.runs import load_run

    cache = run_dir / "analysis" / "metrics.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    run = load_run(run_dir, store)
    m = class_metrics(*predict(run.target, run.target_dm), run.target_dm.num_classes)
    cache.parent.mkdir(exist_ok=True)
    atomic_write_text(cache, json.dumps(m, indent=1))
    return m


def run_transferability(run_dir: Path, store: str | None, max_samples: int) -> dict:
    """The run's recorded scores (results.json ``transferability``) or computed once and cached."""
    from transfer_lab.analysis.runs import _relocate_data, load_source, read_results
    from transfer_lab.analysis.transferability import transferability
    from transfer_lab.builders import make_datamodule
    from omegaconf import OmegaConf

    results = read_results(run_dir)
    if "transferability" in results:
        return results["transferability"]
    cache = run_dir / "analysis" / "transferability.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    raw = results["config"]
    raw["target"]["data"] = _relocate_data(raw["target"]["data"], run_dir)
    cfg = OmegaConf.create(raw)
    source = load_source(results, cfg, run_dir, store)
    if source is None:
        raise ConfigError(f"{run_dir}: strategy={results['strategy']} used no source to score")
    dm = make_datamodule(cfg.target.data, cfg.seed, "target.data", default_shape=tuple(source.input_shape),
                         model_cfg=cfg.target.get("model") or cfg.source.model).prepare()
    scores = transferability(source, dm, max_samples=max_samples)
    cache.parent.mkdir(exist_ok=True)
    atomic_write_text(cache, json.dumps(scores, indent=1))
    return scores


def _runs(dirs: list[str]) -> list[Path]:
    from transfer_lab.analysis.runs import find_runs

    runs = find_runs(dirs)
    if not runs:
        raise ConfigError(f"no finished runs (results.json with status ok) under {', '.join(dirs)}")
    return runs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="transfer-lab-analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("dirs", nargs="+", help="run directories or directories holding runs")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--metrics", action="store_true", help="balanced / per-class accuracy only")
    mode.add_argument("--rank", action="store_true", help="LogME/LEEP vs accuracy, Kendall's τ")
    mode.add_argument("--transferability", action="store_true", help="LogME/LEEP of the runs' sources")
    p.add_argument("--store", help="source store directory (default: the run's store_dir)")
    p.add_argument("--probe", type=int, default=500, help="probe images from the target test set")
    p.add_argument("--source-layers", nargs="+", help="module paths/globs in the source (default: blocks + head)")
    p.add_argument("--target-layers", nargs="+", help="module paths/globs in the target")
    p.add_argument("--max-samples", type=int, default=5000, help="target training images scored")
    p.add_argument("--figure", help="write a summary PNG here (CKA/drift per group, or rank scatter)")
    p.add_argument("--json", help="write the aggregated result here")
    args = p.parse_args(argv)
    try:
        out = _dispatch(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        atomic_write_text(args.json, json.dumps(out, indent=1, default=str))
    return 0


def _dispatch(args: argparse.Namespace) -> Any:
    from transfer_lab.analysis import summary as S
    from transfer_lab.analysis.runs import read_results

    runs = _runs(args.dirs)
    results = [read_results(r) for r in runs]
    if args.transferability:
        out = {str(r): run_transferability(r, args.store, args.max_samples) for r in runs}
        for r, s in out.items():
            print(f"{r}: LogME {s['logme']:.4f}  LEEP {s['leep']:.4f}  (n={s['n']})")
        return out
    if args.rank:
        scores = [run_transferability(r, args.store, args.max_samples) for r in runs]
        summary = S.rank_summary(results, scores)
        print(S.rank_markdown(summary))
        if args.figure:
            from transfer_lab.analysis.plots import save_rank_figure
            for i, row in enumerate(summary["rows"]):
                row["short"] = str(i + 1)
            save_rank_figure(summary["rows"], Path(args.figure), summary["tau_of_means"])
            print("\n" + "\n".join(f"{r['short']}: {r['source']}" for r in summary["rows"]))
        return summary
    if args.metrics:
        metrics = [run_metrics(r, args.store) for r in runs]
        print(S.metrics_table(S.group(results, metrics)))
        return {str(r): m for r, m in zip(runs, metrics)}
    analyses = []
    for r in runs:
        a = analyze_run(r, args.store, args.probe, args.source_layers, args.target_layers)
        analyses.append(a)
        diag = " ".join(f"{k.removeprefix('backbone.')}={v:.2f}" for k, v in a.get("cka", {}).get("diagonal", {}).items())
        print(f"{r}: acc {a['metrics']['acc']:.4f} balanced {a['metrics']['balanced_acc']:.4f}"
              f"{'  CKA ' + diag if diag else ''}  → {r / 'analysis'}")
    summary = S.summarise_representations(S.group(results, analyses))
    if len(runs) > 1 and summary:
        print(S.representation_table(summary))
    if args.figure and summary:
        from transfer_lab.analysis.plots import save_summary_figure
        save_summary_figure(summary, Path(args.figure))
    return {"runs": analyses, "summary": summary}


if __name__ == "__main__":
    sys.exit(main())
