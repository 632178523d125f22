"""DDP probe for tests/test_paired.py: ``python paired_ddp_probe.py OUT_DIR LOADER``.

Trains strategy=dann for one epoch on 2 CPU processes (gloo) and writes, per rank, the ids of the
source and target images its training batches held (``OUT_DIR/rank<r>.json``). Lightning starts
rank 1 by re-running this command line.
"""

import json
import sys
from pathlib import Path

import lightning as L
import torch

from paired_helpers import IdData, image_ids
from transfer_lab.models import convnet
from transfer_lab.module import TransferModule
from transfer_lab.strategies.dann import DANN


def main(out: Path, loader: str) -> None:
    torch.manual_seed(0)
    source = IdData(n=64, loader=loader, seed=0)
    target = IdData(n=64, offset=1000, loader=loader, seed=0)  # no wrap within the epoch
    strategy = DANN(hidden=4)
    model = strategy.build(convnet(1, 8, 3, channels=[4]), convnet(1, 8, 3, channels=[4]))
    module = TransferModule(model, strategy, torch.optim.SGD, lr=0.01, num_classes=3)
    data = strategy.datamodule(target, source)
    seen = {"source": [], "target": []}
    inner = data.on_after_batch_transfer

    def spy(batch, idx):  # the batch as the loaders give it, before the transforms
        if data.trainer.training:
            seen["source"] += image_ids(batch[0], source)
            seen["target"] += image_ids(batch[2], target)
        return inner(batch, idx)

    data.on_after_batch_transfer = spy
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        limit_val_batches=0, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=strategy.callbacks())
    trainer.fit(module, datamodule=data)
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
