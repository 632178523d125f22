"""Local helpers of the protocol tests (tests/test_protocol.py, test_selection.py,
test_convergence.py): a one-parameter module whose validation metric peaks at a chosen step,
and a tiny CPU trainer and loader for it."""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from transfer_lab.schedulers import configure_scheduler


class Walker(L.LightningModule):
    """One parameter ``w`` that SGD(lr=1) moves by +1 per step (loss = −w); the validation metric
    ``val/acc = −(w − peak)²`` peaks at step ``peak``; tests log ``test/w``. Records its LRs."""

    def __init__(self, peak: float = 5.0, schedule=None) -> None:
        super().__init__()
        self.w, self.peak, self.schedule, self.lrs = nn.Parameter(torch.zeros(())), peak, schedule, []

    def training_step(self, batch, batch_idx):
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])
        return -self.w

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", -(self.w.detach() - self.peak) ** 2)

    def test_step(self, batch, batch_idx):
        self.log("test/w", self.w.detach())

    def configure_optimizers(self):
        return configure_scheduler(self.schedule, torch.optim.SGD([self.w], lr=1.0), self.trainer)


def tiny_loader(n: int = 10) -> DataLoader:
    return DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=1)


def tiny_trainer(tmp_path, callbacks=(), **kw) -> L.Trainer:
    kw = {"max_steps": 10, "val_check_interval": 1, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(tmp_path), callbacks=list(callbacks), **kw)
