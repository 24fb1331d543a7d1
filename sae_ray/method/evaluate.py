"""Metrics of one cycle: task accuracy, SAE quality on its TopK codes, interpretability.

All entropies use the natural log; U = I(1[z_j > 0]; Y) / H(Y) is a ratio of two of
them, so it is unit-free as long as both use one base (the original mixed nats and bits).
"""

from __future__ import annotations

import numpy as np
import torch

from sae_ray.sae.model import SparseAutoencoder, fvu


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


def f1_macro(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(
        f1_score(labels, preds, average="macro", labels=np.arange(num_classes), zero_division=0)
    )


def class_selectivity(acts: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    """Mean class selectivity index (Morcos et al. 2018) over alive units:
    (μ_max − μ_rest) / (μ_max + μ_rest), with μ_max the mean of the unit's most active class
    and μ_rest its mean over the other classes. Defined for non-negative activations: dense
    activations are shifted by their minimum first (the index then compares mean heights
    above each unit's floor)."""
    acts = acts.astype(np.float64)
    acts = acts - np.minimum(acts.min(0), 0.0)
    present = [c for c in range(num_classes) if (labels == c).any()]
    if len(present) < 2:
        return 0.0
    means = np.stack([acts[labels == c].mean(0) for c in present])  # (C, m)
    alive = means.max(0) > 0
    if not alive.any():
        return 0.0
    means = means[:, alive]
    top = means.max(0)
    rest = (means.sum(0) - top) / (len(present) - 1)
    return float(((top - rest) / np.maximum(top + rest, 1e-12)).mean())


def cluster_metrics(
    x: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0, sample: int = 2000
) -> dict[str, float]:
    """How the codes group the examples: ARI of k-means (k = classes) against the labels,
    and silhouette / Davies-Bouldin / Calinski-Harabasz of the true labels' grouping.
    Silhouette is O(n²): it runs on a fixed random sample of `sample` rows."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import (
        adjusted_rand_score,
        calinski_harabasz_score,
        davies_bouldin_score,
        silhouette_score,
    )

    nan = float("nan")
    if len(np.unique(labels)) < 2 or len(np.unique(x, axis=0)) < num_classes:
        return {"ari": nan, "silhouette": nan, "davies_bouldin": nan, "calinski_harabasz": nan}
    clusters = KMeans(num_classes, n_init=4, random_state=seed).fit_predict(x)
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "silhouette": float(
            silhouette_score(x, labels, sample_size=min(sample, len(x)), random_state=seed)
        ),
        "davies_bouldin": float(davies_bouldin_score(x, labels)),
        "calinski_harabasz": float(calinski_harabasz_score(x, labels)),
    }


def probe_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_eval: np.ndarray, y_eval: np.ndarray, seed=0
) -> float:
    """Logistic-regression probe fitted on train, scored on the evaluation split."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=2000, random_state=seed)
    probe.fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_eval), y_eval))


def interp_metrics(
    train: tuple[np.ndarray, np.ndarray],
    evaluate: tuple[np.ndarray, np.ndarray],
    num_classes: int,
    sparse_ks: tuple[int, ...] = (1, 5, 25),
    seed: int = 0,
    dense: bool = False,
) -> dict[str, float]:
    """Every interpretability metric of one representation on one evaluation split.

    Probes and the sparse probes' latent choice are fitted on train only. Sparse probes keep
    the k latents with the highest U on train (Gurnee et al.'s k-sparse probing, with U as
    the ranking). For dense activations (`dense`), "fires" means "is positive" for U."""
    (x_tr, y_tr), (x_ev, y_ev) = train, evaluate
    u = interp_u(x_ev, y_ev, num_classes)
    out = {"u": u["u"], "alive_frac": u["alive_frac"]}
    out["csi"] = class_selectivity(x_ev, y_ev, num_classes)
    out.update(cluster_metrics(x_ev, y_ev, num_classes, seed))
    if len(np.unique(y_tr)) < 2:
        return out
    out["probe_accuracy"] = probe_accuracy(x_tr, y_tr, x_ev, y_ev, seed)
    if not dense:
        ranking = np.argsort(-uncertainty_coefficients(x_tr > 0, y_tr, num_classes), kind="stable")
        for k in sparse_ks:
            keep = ranking[: min(k, x_tr.shape[1])]
            out[f"sparse_probe_accuracy@{k}"] = probe_accuracy(
                x_tr[:, keep], y_tr, x_ev[:, keep], y_ev, seed
            )
    return out


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
