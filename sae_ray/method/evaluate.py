"""Metrics of one cycle: task accuracy, SAE quality on its codes, interpretability.

All entropies use the natural log; U = I(1[z_j > 0]; Y) / H(Y) is a ratio of two of
them, so it is unit-free as long as both use one base (the original mixed nats and bits).

SAE codes are kept sparse (`sparse_codes`: a CSR matrix of each row's active indices
and values), so evaluation takes memory O(n·k), not O(n·latents): at the seed's sizes a dense
code matrix is 3-12 GB per split. Every metric accepts the sparse codes or a dense array
(the model's own activations, or a dense reference) and gives the same value for both.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import scipy.sparse as sp
import torch

from sae_ray.sae.model import SparseAutoencoder

Matrix = np.ndarray | sp.csr_matrix
CLUSTER_SAMPLE = 2000  # rows silhouette (O(n²)) reads: a seeded sample, the same every cycle
BATCH_ELEMENTS = 1 << 24  # rows x latents of one batch's pre-activations (64 MB in float32)


def _batch_rows(sae: SparseAutoencoder) -> int:
    return max(1, BATCH_ELEMENTS // sae.cfg.num_latents)


@torch.no_grad()
def active_codes(
    sae: SparseAutoencoder, x: np.ndarray, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's active latents as (values, indices), both (n, w), encoded on `device` in
    batches of at most BATCH_ELEMENTS pre-activations. TopK's w is k; an architecture whose
    L0 varies by row (BatchTopK's threshold, JumpReLU's) pads every row to the widest one
    (at least k), a padded slot holding value 0, so memory stays O(n·w)."""
    sae = sae.to(device).eval()
    batch = _batch_rows(sae)
    parts = []
    for start in range(0, len(x), batch):
        codes = sae.encode(torch.from_numpy(x[start : start + batch]).to(device))
        parts.append((codes.values.float().cpu().numpy(), codes.indices.cpu().numpy()))
    width = max([v.shape[1] for v, _ in parts], default=sae.cfg.k)
    values = np.zeros((len(x), width), np.float32)
    indices = np.zeros((len(x), width), np.int64)
    start = 0
    for v, i in parts:
        values[start : start + len(v), : v.shape[1]] = v
        indices[start : start + len(v), : v.shape[1]] = i
        start += len(v)
    return values, indices


def sparse_codes(
    sae: SparseAutoencoder, x: np.ndarray, device: torch.device | str = "cpu"
) -> sp.csr_matrix:
    """The SAE's codes of the rows of `x` as a CSR matrix (explicit zeros, TopK's and the
    padding's, removed: a latent "fires" when it is positive)."""
    values, indices = active_codes(sae, x, device)
    width = values.shape[1]
    codes = sp.csr_matrix(
        (values.ravel(), indices.astype(np.int32).ravel(), np.arange(len(x) + 1) * width),
        shape=(len(x), sae.cfg.num_latents),
    )
    codes.eliminate_zeros()
    codes.sort_indices()
    return codes


def _fires(x: Matrix) -> Matrix:
    """1.0 where a feature fires (is positive), as float64, sparse if `x` is."""
    return (x > 0).astype(np.float64)


def _column_any(fires: Matrix) -> np.ndarray:
    return np.asarray(fires.sum(0)).ravel() > 0


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.clip(p, 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=axis)


def uncertainty_coefficients(fires: Matrix, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """U_j = I(f_j; Y) / H(Y) for each binary feature column f_j of `fires` (n, m)."""
    n = len(labels)
    onehot = np.eye(num_classes)[labels]  # (n, C)
    fires = fires.astype(np.float64)
    joint_on = np.asarray(fires.T @ onehot)  # (m, C): count(f=1, y=c)
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


NULL_PERMUTATIONS = 5


def interp_u(
    codes: Matrix, labels: np.ndarray, num_classes: int, seed: int = 0
) -> dict[str, float]:
    """Mean U over the latents alive on these examples, the alive fraction, and U's null:
    the same codes against permuted labels (mean of a few seeded permutations). U is biased
    upward at small n (label-independent latents score > 0), so `u_excess = u - u_null` is
    what the labels explain."""
    fires = _fires(codes)
    alive = _column_any(fires)
    if not alive.any():
        return {"u": 0.0, "alive_frac": 0.0, "u_null": 0.0, "u_excess": 0.0}
    u = float(uncertainty_coefficients(fires, labels, num_classes)[alive].mean())
    rng = np.random.default_rng(seed)
    null = float(
        np.mean(
            [
                uncertainty_coefficients(fires, rng.permutation(labels), num_classes)[alive].mean()
                for _ in range(NULL_PERMUTATIONS)
            ]
        )
    )
    return {"u": u, "alive_frac": float(alive.mean()), "u_null": null, "u_excess": u - null}


U_TOP = 16  # latents `interp_u_top` averages: a fixed count, whatever is alive


def interp_u_top(
    ranking: np.ndarray,
    evaluate: tuple[Matrix, np.ndarray],
    num_classes: int,
    seed: int = 0,
    top: int = U_TOP,
) -> dict[str, float]:
    """U over a fixed number of latents: the first `top` of `ranking` (highest U on train
    first), scored on the evaluation split, with its null (the same latents against
    permuted evaluation labels). Mean U over the alive latents moves when uninformative
    latents die or wake (its denominator changes); this one does not, and choosing on
    train keeps the choice from flattering the evaluation split."""
    x_ev, y_ev = evaluate
    fires = _fires(x_ev[:, ranking[: min(top, x_ev.shape[1])]])
    u = float(uncertainty_coefficients(fires, y_ev, num_classes).mean())
    rng = np.random.default_rng(seed)
    null = float(
        np.mean(
            [
                uncertainty_coefficients(fires, rng.permutation(y_ev), num_classes).mean()
                for _ in range(NULL_PERMUTATIONS)
            ]
        )
    )
    return {"u_top": u, "u_top_null": null, "u_top_excess": u - null}


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float((preds == labels).mean())


def f1_macro(preds: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(
        f1_score(labels, preds, average="macro", labels=np.arange(num_classes), zero_division=0)
    )


def _class_means(x: Matrix, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """(C, m) mean of each class's rows, by a sparse indicator product (no dense copy of x)."""
    rows = np.concatenate([np.flatnonzero(labels == c) for c in classes])
    which = np.concatenate([np.full((labels == c).sum(), i) for i, c in enumerate(classes)])
    counts = np.bincount(which, minlength=len(classes)).astype(np.float64)
    indicator = sp.csr_matrix((1.0 / counts[which], (which, rows)), (len(classes), len(labels)))
    means = indicator @ x
    return means.toarray() if sp.issparse(means) else np.asarray(means)


def class_selectivity(acts: Matrix, labels: np.ndarray, num_classes: int) -> float:
    """Mean class selectivity index (Morcos et al. 2018) over alive units:
    (μ_max − μ_rest) / (μ_max + μ_rest), with μ_max the mean of the unit's most active class
    and μ_rest its mean over the other classes. Defined for non-negative activations: dense
    activations are shifted by their minimum first (the index then compares mean heights
    above each unit's floor)."""
    acts = acts.astype(np.float64)
    present = [c for c in range(num_classes) if (labels == c).any()]
    if len(present) < 2:
        return 0.0
    means = _class_means(acts, labels, present)  # (C, m)
    if not sp.issparse(acts):  # SAE codes are >= 0 already
        means -= np.minimum(acts.min(0), 0.0)
    alive = means.max(0) > 0
    if not alive.any():
        return 0.0
    means = means[:, alive]
    top = means.max(0)
    rest = (means.sum(0) - top) / (len(present) - 1)
    return float(((top - rest) / np.maximum(top + rest, 1e-12)).mean())


def _distinct_rows_at_least(x: Matrix, count: int) -> bool:
    """Whether `x` has `count` distinct rows (k-means needs one per cluster), stopping as
    soon as it finds them."""
    seen: set[bytes] = set()
    for i in range(x.shape[0]):
        if sp.issparse(x):
            row = x.indices[x.indptr[i] : x.indptr[i + 1]].tobytes()
            row += x.data[x.indptr[i] : x.indptr[i + 1]].tobytes()
        else:
            row = np.ascontiguousarray(x[i]).tobytes()
        seen.add(row)
        if len(seen) >= count:
            return True
    return False


def _centroid_scores(x: sp.csr_matrix, labels: np.ndarray) -> tuple[float, float]:
    """Davies-Bouldin and Calinski-Harabasz of the labels' grouping of sparse rows, exactly
    as sklearn defines them (which accepts dense input only), from centroids and row norms:
    ‖x − μ‖² = ‖x‖² − 2 x·μ + ‖μ‖², never a dense copy of x."""
    from sklearn.metrics import pairwise_distances

    classes, which = np.unique(labels, return_inverse=True)
    n, k = x.shape[0], len(classes)
    centroids = _class_means(x, which, list(range(k)))  # (k, m)
    counts = np.bincount(which, minlength=k)
    row_sq = np.asarray(x.multiply(x).sum(1)).ravel()
    cross = np.asarray(x @ centroids.T)[np.arange(n), which]
    cent_sq = (centroids**2).sum(1)
    to_own = np.sqrt(np.maximum(row_sq - 2 * cross + cent_sq[which], 0.0))
    mean = np.asarray(x.mean(0)).ravel()
    extra = float((counts * ((centroids - mean) ** 2).sum(1)).sum())
    intra = float((to_own**2).sum())
    ch = 1.0 if intra == 0 else extra * (n - k) / (intra * (k - 1))
    spread = np.bincount(which, weights=to_own, minlength=k) / counts
    gaps = pairwise_distances(centroids)  # (k, k), exact zeros on the diagonal
    if np.allclose(spread, 0) or np.allclose(gaps, 0):
        return 0.0, ch
    gaps[gaps == 0] = np.inf
    db = float(np.max((spread[:, None] + spread) / gaps, axis=1).mean())
    return db, ch


def cluster_metrics(
    x: Matrix, labels: np.ndarray, num_classes: int, seed: int = 0, sample: int = CLUSTER_SAMPLE
) -> dict[str, float]:
    """How the codes group the examples: ARI of k-means (k = classes) against the labels,
    and silhouette / Davies-Bouldin / Calinski-Harabasz of the true labels' grouping.
    Silhouette is O(n²): it runs on a seeded random sample of `sample` rows; the others use
    every row (sparse rows included)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import (
        adjusted_rand_score,
        calinski_harabasz_score,
        davies_bouldin_score,
        silhouette_score,
    )

    nan = float("nan")
    if len(np.unique(labels)) < 2 or not _distinct_rows_at_least(x, num_classes):
        return {"ari": nan, "silhouette": nan, "davies_bouldin": nan, "calinski_harabasz": nan}
    clusters = KMeans(num_classes, n_init=4, random_state=seed).fit_predict(x)
    if sp.issparse(x):
        db, ch = _centroid_scores(x, labels)
    else:
        db, ch = davies_bouldin_score(x, labels), calinski_harabasz_score(x, labels)
    return {
        "ari": float(adjusted_rand_score(labels, clusters)),
        "silhouette": float(
            silhouette_score(x, labels, sample_size=min(sample, x.shape[0]), random_state=seed)
        ),
        "davies_bouldin": float(db),
        "calinski_harabasz": float(ch),
    }


def probe_accuracy(
    x_train: Matrix, y_train: np.ndarray, x_eval: Matrix, y_eval: np.ndarray, seed=0, center=True
) -> float:
    """Logistic-regression probe fitted on train, scored on the evaluation split. SAE codes
    are scaled without centering (`center=False`), which keeps them sparse; the unpenalized
    intercept absorbs the shift, so the probe is the same one."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_mean=center).fit(x_train)
    probe = LogisticRegression(max_iter=2000, random_state=seed)
    probe.fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_eval), y_eval))


def interp_metrics(
    train: tuple[Matrix, np.ndarray],
    evaluate: tuple[Matrix, np.ndarray],
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
    out = interp_u(x_ev, y_ev, num_classes, seed)
    out["csi"] = class_selectivity(x_ev, y_ev, num_classes)
    out.update(cluster_metrics(x_ev, y_ev, num_classes, seed))
    if len(np.unique(y_tr)) < 2:
        return out
    u_train = uncertainty_coefficients(_fires(x_tr), y_tr, num_classes)
    ranking = np.argsort(-u_train, kind="stable")  # the latents most informative on train
    out.update(interp_u_top(ranking, evaluate, num_classes, seed))
    out["probe_accuracy"] = probe_accuracy(x_tr, y_tr, x_ev, y_ev, seed, center=dense)
    if not dense:
        for k in sparse_ks:
            keep = ranking[: min(k, x_tr.shape[1])]
            out[f"sparse_probe_accuracy@{k}"] = probe_accuracy(
                x_tr[:, keep], y_tr, x_ev[:, keep], y_ev, seed, center=False
            )
    return out


@torch.no_grad()
def sae_quality(
    sae: SparseAutoencoder,
    tokens: np.ndarray | Iterable[np.ndarray],
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """FVU, explained variance, L0, dead % and SAEBench's L2 ratio (the mean over tokens of
    ‖x̂‖ / ‖x‖: below 1, the SAE shrinks what it reconstructs) over held-out token rows, in
    one streaming pass: `tokens` is an array or an iterable of row batches (e.g.
    `iter_tokens`), and only float64 sums are kept (FVU = Σ‖x − x̂‖² / (Σ‖x‖² − n‖x̄‖²))."""
    sae = sae.to(device).eval()
    batch_size = _batch_rows(sae)
    if isinstance(tokens, np.ndarray):
        tokens = [tokens]
    fired = torch.zeros(sae.cfg.num_latents, dtype=torch.bool, device=device)
    n, l0, err, sq, total, ratio, normed = 0, 0, 0.0, 0.0, None, 0.0, 0
    for part in tokens:
        for start in range(0, len(part), batch_size):
            xb = torch.from_numpy(part[start : start + batch_size]).to(device)
            x_hat, codes = sae(xb)
            on = codes.values > 0
            l0 += int(on.sum())
            fired[codes.indices[on]] = True
            x64 = xb.double()
            err += float((x64 - x_hat.double()).pow(2).sum())
            sq += float(x64.pow(2).sum())
            total = x64.sum(0) if total is None else total + x64.sum(0)
            norm = x64.norm(dim=-1)
            some = norm > 0  # SAEBench leaves out rows of norm 0
            ratio += float((x_hat.double().norm(dim=-1)[some] / norm[some]).sum())
            normed += int(some.sum())
            n += len(xb)
    variance = sq - float(total.pow(2).sum()) / n if n else 0.0
    value = err / max(variance, 1e-12)
    return {
        "fvu": value,
        "explained_variance": 1.0 - value,
        "l0": l0 / max(n, 1),
        "dead_pct": 100.0 * (1 - fired.float().mean().item()),
        "l2_ratio": ratio / max(normed, 1),
    }
