"""Metrics of one cycle: task accuracy, SAE quality on its TopK codes, interpretability.

All entropies use the natural log; U = I(1[z_j > 0]; Y) / H(Y) is a ratio of two of
them, so it is unit-free as long as both use one base (the original mixed nats and bits).
"""

from __future__ import annotations

import numpy as np
import torch

from sae_ray.sae import SparseAutoencoder, fvu


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)


def uncertainty_coefficients(fires: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """U_j = I(f_j; Y) / H(Y) for each binary feature column f_j of `fires` (n, m)."""
    n = len(labels)
    onehot = np.eye(num_classes)[labels]  # (n, C)
    joint_on = fires.astype(np.float64).T @ onehot  # (m, C): count(f=1, y=c)
    joint_off = onehot.sum(0) - joint_on  # count(f=0, y=c)
    p_y = onehot.sum(0) / n
    h_y = _entropy(p_y)
    if h_y == 0:
        return np.zeros(fires.shape[1])
    p_on = joint_on.sum(1) / n
    h_y_given_f = p_on * _entropy(joint_on / np.maximum(joint_on.sum(1, keepdims=True), 1)) + (
        1 - p_on
    ) * _entropy(joint_off / np.maximum(joint_off.sum(1, keepdims=True), 1))
    return np.clip((h_y - h_y_given_f) / h_y, 0.0, 1.0)


def interp_u(codes: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """Mean U over the latents alive on these examples, and the alive fraction beside it."""
    fires = codes > 0
    alive = fires.any(0)
    u = uncertainty_coefficients(fires[:, alive], labels, num_classes)
    return {"u": float(u.mean()) if alive.any() else 0.0, "alive_frac": float(alive.mean())}


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean())


@torch.no_grad()
def sae_quality(
    sae: SparseAutoencoder, tokens: np.ndarray, batch_size: int = 4096
) -> dict[str, float]:
    """FVU, explained variance, L0 and dead % over held-out token rows."""
    sae.eval()
    x = torch.from_numpy(tokens)
    x_hat_parts, fired = [], torch.zeros(sae.cfg.num_latents, dtype=torch.bool)
    l0 = 0.0
    for start in range(0, len(x), batch_size):
        xb = x[start : start + batch_size]
        x_hat, codes = sae(xb)
        x_hat_parts.append(x_hat)
        on = codes.values > 0
        l0 += on.sum().item()
        fired[codes.indices[on]] = True
    value = fvu(x, torch.cat(x_hat_parts)).item()
    return {
        "fvu": value,
        "explained_variance": 1.0 - value,
        "l0": l0 / len(x),
        "dead_pct": 100.0 * (1 - fired.float().mean().item()),
    }


@torch.no_grad()
def encode_dense(sae: SparseAutoencoder, x: np.ndarray) -> np.ndarray:
    sae.eval()
    return sae.dense_codes(torch.from_numpy(x)).numpy()
