"""SAEBench's sparse probing (`sae_bench/evals/sparse_probing`), one-vs-rest per class.

For each class: the class's rows against as many rows drawn from the other classes (each
other class gives ceil(n / (classes - 1)) of them, then n are kept), shuffled, on train and
on the evaluation split alike; the k dimensions whose means differ most between the two
sides on train; a logistic probe (sklearn's L2, C = 1) on those k dimensions, scored on the
evaluation split. The reading is the mean accuracy over classes, at k = 1, 2, 5, of the SAE
codes (`sae_top_k`) and of the model's own dimensions (`llm_top_k`).

The draws follow SAEBench's order on a torch generator seeded with `seed`, so on the same
activations the accuracies equal its code's (`tests/test_sparse_probing.py` checks that
against the `sae-bench` package). SAEBench mean-pools each text's token codes; sae-ray
probes where the classifier reads, its pooled position.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
import torch

Matrix = np.ndarray | sp.csr_matrix
KS = (1, 2, 5)  # SAEBench's k_values


def _balanced(by_class: dict[int, np.ndarray], positive: int, gen: torch.Generator):
    """Row indices and 0/1 labels of one class against the rest, shuffled (SAEBench's
    `prepare_probe_data`). Where the other classes have fewer rows than the class (a
    binary task's larger class), a seeded sample of the class's rows as many as they have
    (SAEBench stops there with an assertion)."""
    pos = by_class[positive]
    others = [c for c in by_class if c != positive]
    available = sum(len(by_class[c]) for c in others)
    if available < len(pos):
        pos = np.sort(pos[torch.randperm(len(pos), generator=gen)[:available].numpy()])
    per_class = math.ceil(len(pos) / len(others))
    negatives = [
        by_class[c][torch.randperm(len(by_class[c]), generator=gen)[:per_class].numpy()]
        for c in others
    ]
    neg = np.concatenate(negatives)
    neg = neg[torch.randperm(len(neg), generator=gen)[: len(pos)].numpy()]
    if len(neg) != len(pos):  # an uneven spread over three or more other classes
        return None
    rows = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    order = torch.randperm(len(rows), generator=gen).numpy()
    return rows[order], labels[order]


def _rows(x: Matrix, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    part = x[rows] if columns is None else x[rows][:, columns]
    return np.asarray(part.toarray() if sp.issparse(part) else part, dtype=np.float32)


def top_k_dims(x: Matrix, labels: np.ndarray, k: int) -> np.ndarray:
    """The k columns with the largest |mean(positive) - mean(negative)|, in column order
    (SAEBench's `get_top_k_mean_diff_mask`, then its reduce-dim gather)."""
    pos = np.asarray(x[labels == 1].mean(0), dtype=np.float32).ravel()
    neg = np.asarray(x[labels == 0].mean(0), dtype=np.float32).ravel()
    diff = torch.from_numpy(pos) - torch.from_numpy(neg)
    top = torch.argsort(diff.abs(), descending=True)[:k]
    return np.sort(top.numpy())


def _probe_accuracy(x_train, y_train, x_eval, y_eval) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score

    probe = LogisticRegression(C=1.0, max_iter=1000).fit(x_train, y_train)
    return float(accuracy_score(y_eval, probe.predict(x_eval)))


def class_accuracies(
    train: tuple[Matrix, np.ndarray], evaluate: tuple[Matrix, np.ndarray], k: int, seed: int = 0
) -> dict[int, float]:
    """Each class's one-vs-rest test accuracy on the top-k dimensions: `train` and
    `evaluate` are (activations, class labels); classes with fewer than 2 rows on either
    split, or too few rows elsewhere to balance them, are left out."""
    (x_tr, y_tr), (x_ev, y_ev) = train, evaluate
    classes = [c for c in np.unique(y_tr) if (y_tr == c).sum() >= 2 and (y_ev == c).sum() >= 2]
    if len(classes) < 2:
        return {}
    train_rows = {c: np.flatnonzero(y_tr == c) for c in classes}
    eval_rows = {c: np.flatnonzero(y_ev == c) for c in classes}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for c in classes:
        tr, ev = _balanced(train_rows, c, gen), _balanced(eval_rows, c, gen)
        if tr is None or ev is None:
            continue
        dims = top_k_dims(x_tr[tr[0]], tr[1], min(k, x_tr.shape[1]))
        out[int(c)] = _probe_accuracy(
            _rows(x_tr, tr[0], dims), tr[1], _rows(x_ev, ev[0], dims), ev[1]
        )
    return out


def sparse_probing(
    codes: tuple[Matrix, Matrix],
    dense: tuple[np.ndarray, np.ndarray],
    labels: tuple[np.ndarray, np.ndarray],
    ks: tuple[int, ...] = KS,
    seed: int = 0,
) -> dict[str, float]:
    """`sae_top_{k}_accuracy` and `llm_top_{k}_accuracy`: the mean over classes of the
    top-k probes on the SAE codes and on the model's activations, each pair (train,
    evaluation split)."""
    out = {}
    for name, (x_tr, x_ev) in (("sae", codes), ("llm", dense)):
        for k in ks:
            per_class = class_accuracies((x_tr, labels[0]), (x_ev, labels[1]), k, seed)
            if per_class:
                out[f"{name}_top_{k}_accuracy"] = float(np.mean(list(per_class.values())))
    return out
