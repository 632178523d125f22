"""Is the teacher the distillation run uses the teacher the store trained? A bug check.

    OMP_NUM_THREADS=1 python experiments/distillation/check_teacher.py experiment=distillation_cifar [seed=0 ...]

For the composed config: loads the source (teacher) from the store as ``run`` does, builds the
``distill`` strategy, and prints (1) the teacher's target-test accuracy as the store recorded it
and (2) as recomputed through the strategy's own path (target batches, normalised by the target
data module, re-expressed by ``teacher_input``, teacher in eval mode) — they must agree; (3) the
teacher's accuracy on one epoch of *augmented* training batches, as the KD term sees them, with
the same teacher put in train mode for contrast (what a BatchNorm/dropout bug would feed the
student); (4) the KD term for the teacher's own logits (must be 0) and for uniform student logits.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from transfer_lab.builders import build_model
from transfer_lab.run import prepare
from transfer_lab.source_stage import source_stage
from transfer_lab.strategies.distill import kd_loss

CONF = Path(__file__).resolve().parents[2] / "conf"


@torch.no_grad()
def accuracy(strategy, dm, x_u8, y, train_mode: bool, augment: bool) -> float:
    # a copy in train mode: BatchNorm would otherwise update the real teacher's statistics
    teacher = copy.deepcopy(strategy.teacher).train() if train_mode else strategy.teacher.eval()
    correct = 0
    for xb, yb in zip(x_u8.split(500), y.split(500)):
        x = dm.transform(xb, train=augment)
        correct += int((teacher(strategy.teacher_input(x)).argmax(1) == yb).sum())
    return correct / len(y)


def main() -> None:
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[1:])
    p = prepare(cfg)
    strategy, source_dm, target_dm, model_cfg = p.strategy, p.source_dm, p.target_dm, p.target_model_cfg
    source, record = source_stage(cfg, strategy, source_dm)
    strategy.build(source, build_model(model_cfg, target_dm))
    strategy.datamodule(target_dm, source_dm)
    torch.manual_seed(0)
    print(f"store record    test/acc {record.get('test/acc'):.4f}  (cache hit: {record['cache_hit']})")
    print(f"distill path    test/acc {accuracy(strategy, target_dm, target_dm.x_test, target_dm.y_test, False, False):.4f}"
          f"  (teacher.training after build: {strategy.teacher.training})")
    for mode in (False, True):
        acc = accuracy(strategy, target_dm, target_dm.x_train, target_dm.y_train, mode, True)
        print(f"train batches, augment={target_dm.augment}, teacher {'train' if mode else 'eval '} mode: acc {acc:.4f}")
    with torch.no_grad():
        z = strategy.teacher(strategy.teacher_input(target_dm.transform(target_dm.x_test[:500], False)))
    print(f"KD(teacher, teacher) {kd_loss(z, z, strategy.temperature):.2e}; "
          f"KD(uniform, teacher) {kd_loss(torch.zeros_like(z), z, strategy.temperature):.3f} at T={strategy.temperature}")


if __name__ == "__main__":
    main()
