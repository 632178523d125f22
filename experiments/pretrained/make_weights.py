"""Pretrain a timm ResNet once on CIFAR-10 (JPEG copy) classes 0–4 and write it as timm weights.

The study's "pretrained model": trained with the project's own command line (``strategy=scratch``
on the 0–4 classes, nothing transferred), then rewritten under timm's parameter names
(``timm_state_dict``: backbone and the 5-class head as timm's ``fc``) into a ``.safetensors`` file
that ``timm.create_model(name, num_classes=5)`` and ``model@source.model=timm
source.model.weights=<file>`` both load. The file's metadata carries the training data's mean/std
(a model trained on its own data expects them, like ImageNet weights expect ImageNet's); the
script prints them, the source test accuracy and the file's sha256.

    python experiments/pretrained/make_weights.py [--name resnet10t] [--epochs 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from transfer_lab.io import atomic_save_safetensors, load_safetensors_file, sha256_file
from transfer_lab.models import timm_model, timm_state_dict

HERE = Path(__file__).resolve().parent
CLASSES = "[0,1,2,3,4]"


def train(name: str, epochs: int, lr: float, run_dir: Path) -> dict:
    """One ``transfer_lab.train`` run: a randomly initialised timm model trained on classes 0–4."""
    cmd = [sys.executable, "-m", "transfer_lab.train", "strategy=scratch",
           "model@target.model=timm", f"target.model.name={name}",
           "data@target.data=cifar10_npz", f"target.data.classes={CLASSES}",
           f"target.epochs={epochs}", "scheduler@target.scheduler=cosine", f"target.optimizer.lr={lr}",
           "target.save_weights=full", "transferability=false", "resume=false", "logger=none",
           f"hydra.run.dir={run_dir}"]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((run_dir / "results.json").read_text())


def to_timm_file(name: str, results: dict, run_dir: Path, out: Path) -> None:
    """The run's full state dict → timm's names, with the data statistics in the metadata."""
    shape = results["data"]["target"].get("input_shape") or [3, 32, 32]
    model = timm_model(in_channels=int(shape[0]), image_size=int(shape[-1]), num_classes=5, name=name)
    model.load_state_dict(load_safetensors_file(run_dir / "target.safetensors"))
    mean, std = results["data"]["target"]["mean"], results["data"]["target"]["std"]
    meta = {"timm_name": name, "trained_on": "CIFAR-10 (JPEG copy) train20k, classes 0-4",
            "num_classes": "5", "mean": json.dumps(mean), "std": json.dumps(std),
            "input_size": json.dumps(list(shape)),
            "test_acc": f"{results['metrics']['test/acc']:.4f}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out, timm_state_dict(model), metadata=meta)
    # the check a user would make: timm itself loads the file strictly and computes the same logits
    import timm
    from safetensors.torch import load_file

    ref = timm.create_model(name, num_classes=5)
    ref.load_state_dict(load_file(str(out)))
    x = torch.randn(4, *shape)
    assert torch.allclose(ref.eval()(x), model.eval()(x), atol=1e-4), "timm's model differs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="resnet10t", help="timm architecture (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", type=Path, default=None, help="default: weights/<name>_cifar0-4.safetensors here")
    a = p.parse_args()
    out = a.out or HERE / "weights" / f"{a.name}_cifar0-4.safetensors"
    run_dir = HERE / "runs" / f"pretrain_{a.name}"
    results = train(a.name, a.epochs, a.lr, run_dir)
    to_timm_file(a.name, results, run_dir, out)
    d = results["data"]["target"]
    print(f"source test/acc (classes 0-4, {results['timings']['total_s']:.0f} s): "
          f"{results['metrics']['test/acc']:.4f}")
    print(f"mean={json.dumps(d['mean'])} std={json.dumps(d['std'])}")
    print(f"{out}\nsha256={sha256_file(out)}")


if __name__ == "__main__":
    main()
