"""Transferability before training: LogME (You et al., 2021) and LEEP (Nguyen et al., 2020).

Both score a *frozen* source model on the labelled target training set, before any fine-tuning:

* **LogME** — the log marginal likelihood (evidence) per sample of a Bayesian linear regression
  from the source's penultimate features to each one-hot target label column, with the prior
  precision α and noise precision β set by evidence maximisation (MacKay's fixed-point updates),
  averaged over classes. Higher: the features explain the labels linearly with less effort.
* **LEEP** — the mean log-likelihood of the target labels under the "expected empirical
  predictor": source soft predictions θ(x) over source classes z, pushed through the empirical
  conditional P(y | z) estimated on the target set. Higher (closer to 0) is better.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def logme_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """Per-sample log evidence log p(y | F, α, β) / N of ``y = F m + ε``, m ~ N(0, α⁻¹I), ε ~ N(0, β⁻¹I).

    The closed form of You et al. (2021), eq. 2, through the eigenvalues of FᵀF.
    """
    f, y = np.asarray(f, np.float64), np.asarray(y, np.float64)
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0.0, None)
    m = _posterior_mean(f, y, s, v, alpha, beta)
    res2 = float(((y - f @ m) ** 2).sum())
    m2 = float(m @ m)
    ev = (d / 2 * math.log(alpha) + n / 2 * math.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
          - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * math.log(2 * math.pi))
    return float(ev) / n


def _posterior_mean(f, y, s, v, alpha, beta) -> np.ndarray:
    # m = β (αI + β FᵀF)⁻¹ Fᵀ y, in the eigenbasis of FᵀF
    return v @ ((beta / (alpha + beta * s)) * (v.T @ (f.T @ y)))


def logme_column(f: np.ndarray, y: np.ndarray, max_iter: int = 100,
                 tol: float = 1e-6) -> tuple[float, float, float]:
    """Maximise the evidence over α, β for one target column. Returns ``(evidence/N, α, β)``."""
    f, y = np.asarray(f, np.float64), np.asarray(y, np.float64)
    n, _ = f.shape
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0.0, None)
    alpha, beta = 1.0, 1.0  # the paper's initialisation
    for _ in range(max_iter):
        m = _posterior_mean(f, y, s, v, alpha, beta)
        gamma = float((beta * s / (alpha + beta * s)).sum())  # effective number of parameters
        alpha_new = gamma / max(float(m @ m), 1e-300)
        # γ ≤ rank(F) ≤ n exactly; with n < d rounding can push it past n (β < 0, log fails)
        beta_new = max(n - gamma, 1e-10) / max(float(((y - f @ m) ** 2).sum()), 1e-300)
        done = abs(alpha_new / beta_new - alpha / beta) <= tol * (alpha / beta)
        alpha, beta = alpha_new, beta_new
        if done:
            break
    return logme_evidence(f, y, alpha, beta), alpha, beta


def logme(features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> float:
    """LogME of features (N × D) for integer labels (N,): mean over classes of the maximised
    per-sample evidence of the one-hot column."""
    f = np.asarray(torch.as_tensor(features).double().cpu())
    y = np.asarray(torch.as_tensor(labels).cpu()).astype(int)
    classes = np.unique(y)
    return float(np.mean([logme_column(f, (y == c).astype(np.float64))[0] for c in classes]))


def leep(source_probs: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor,
         num_classes: int | None = None) -> float:
    """LEEP of source predictions θ (N × Z, rows sum to 1) for target labels (N,) in 0..K-1."""
    theta = np.asarray(torch.as_tensor(source_probs).double().cpu())
    y = np.asarray(torch.as_tensor(labels).cpu()).astype(int)
    n = len(y)
    k = num_classes or int(y.max()) + 1
    joint = np.zeros((k, theta.shape[1]))  # P̂(y, z) = 1/N Σ_i θ_z(x_i) [y_i = y]
    np.add.at(joint, y, theta / n)
    cond = joint / np.clip(joint.sum(axis=0, keepdims=True), 1e-300, None)  # P̂(y | z)
    eep = (theta * cond[y]).sum(axis=1)  # Σ_z P̂(y_i | z) θ_z(x_i)
    return float(np.log(np.clip(eep, 1e-300, None)).mean())


@torch.no_grad()
def source_outputs(model: nn.Module, x: torch.Tensor,
                   batch_size: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features ``model.backbone(x)`` and softmax predictions ``model.head(·)``."""
    was_training = model.training
    model.eval()
    feats, probs = [], []
    try:
        for xb in x.split(batch_size):
            f = model.backbone(xb)
            feats.append(f.reshape(len(xb), -1).cpu())
            probs.append(torch.softmax(model.head(f), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(feats), torch.cat(probs)


def transferability(source_model: nn.Module, target_dm, max_samples: int | None = 5000,
                    seed: int = 0) -> dict[str, float]:
    """LogME and LEEP of a frozen source model on the target training set.

    Args:
        source_model: a ``Classifier`` (``backbone`` → features, ``head`` → source logits) whose
            input shape matches the target data's.
        target_dm: a ``TransferDataModule`` (prepared here if it is not yet).
        max_samples: score at most this many training images (a seeded subset; None: all).
        seed: draws that subset.

    Returns:
        ``{"logme": float, "leep": float, "n": int}``.
    """
    target_dm.prepare()
    x, y = target_dm.x_train, target_dm.y_train
    if max_samples is not None and len(y) > max_samples:
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:max_samples]
        x, y = x[idx], y[idx]
    device = next(source_model.parameters()).device
    xf = target_dm.transform(x.to(device), train=False)
    feats, probs = source_outputs(source_model, xf)
    return {"logme": logme(feats, y), "leep": leep(probs, y, target_dm.num_classes), "n": int(len(y))}
