"""Accuracy, per-class accuracy and balanced accuracy of a model on a data module's test set."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, dm, split: str = "test", batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true labels on ``dm``'s ``split`` (``train`` / ``val`` / ``test``)."""
    dm.prepare()
    x, y = getattr(dm, f"x_{split}"), getattr(dm, f"y_{split}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        preds = [model(dm.transform(xb.to(device), train=False)).argmax(1).cpu()
                 for xb in x.split(batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(preds), y.cpu()


def class_metrics(pred: torch.Tensor, true: torch.Tensor, num_classes: int) -> dict:
    """``acc``, ``balanced_acc`` (mean per-class recall over classes present) and ``per_class_acc``."""
    per_class = []
    for c in range(num_classes):
        mask = true == c
        per_class.append(float((pred[mask] == c).float().mean()) if mask.any() else float("nan"))
    present = [a for a in per_class if a == a]
    return {"acc": float((pred == true).float().mean()),
            "balanced_acc": sum(present) / len(present) if present else float("nan"),
            "per_class_acc": per_class}
