"""SAEBench's sparse probing, checked against SAEBench's own code (`sae-bench`, a dev
dependency) on the same activations and SAE codes."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sae_bench.evals.sparse_probing import probe_training  # make install: --no-deps

from sae_ray.method.evaluate import sparse_codes
from sae_ray.method.sparse_probing import class_accuracies, sparse_probing, top_k_dims
from sae_ray.sae.model import SaeConfig, SparseAutoencoder


def _task(n: int, d: int, classes: int, seed: int):
    """Rows whose class shifts a few dimensions: separable, but not by every dimension."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[np.arange(n), y] += 2.0
    return x, y


def _saebench(x_tr, y_tr, x_ev, y_ev, k: int, seed: int) -> dict[int, float]:
    """SAEBench's `train_probe_on_activations` on our data, its global torch RNG seeded."""

    def by_class(x, y):
        return {str(c): torch.from_numpy(np.asarray(x[y == c], np.float32)) for c in np.unique(y)}

    torch.manual_seed(seed)
    # unwrapped from its shape check: its annotations name one size twice (rows per class,
    # rows per probe set), so the checked function refuses its own data
    _, acc = probe_training.train_probe_on_activations.__wrapped__(
        by_class(x_tr, y_tr), by_class(x_ev, y_ev), select_top_k=k
    )
    return {int(c): a for c, a in acc.items()}


@pytest.mark.parametrize("k", [1, 2, 5])
def test_model_dimensions_equal_saebench(k):
    x_tr, y_tr = _task(300, 24, 4, 0)
    x_ev, y_ev = _task(160, 24, 4, 1)
    ours = class_accuracies((x_tr, y_tr), (x_ev, y_ev), k, seed=7)
    theirs = _saebench(x_tr, y_tr, x_ev, y_ev, k, seed=7)
    assert ours.keys() == theirs.keys() and len(ours) == 4
    for c in ours:
        assert ours[c] == pytest.approx(theirs[c], abs=1e-6)
    assert 0.5 < np.mean(list(ours.values())) <= 1.0


def test_sae_codes_equal_saebench_dense_or_sparse():
    """The same SAE's codes, handed to SAEBench dense and to ours as sparse CSR."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(d_in=24, num_latents=96, k=6))
    x_tr, y_tr = _task(300, 24, 3, 2)
    x_ev, y_ev = _task(150, 24, 3, 3)
    c_tr, c_ev = sparse_codes(sae, x_tr), sparse_codes(sae, x_ev)
    assert sp.issparse(c_tr)
    for k in (1, 2, 5):
        ours = class_accuracies((c_tr, y_tr), (c_ev, y_ev), k, seed=3)
        theirs = _saebench(c_tr.toarray(), y_tr, c_ev.toarray(), y_ev, k, seed=3)
        assert ours.keys() == theirs.keys()
        for c in ours:
            assert ours[c] == pytest.approx(theirs[c], abs=1e-6)


def test_top_k_dims_is_saebench_mask():
    x, y = _task(200, 16, 2, 4)
    labels = (y == 1).astype(np.int32)
    mask = probe_training.get_top_k_mean_diff_mask(torch.from_numpy(x), torch.from_numpy(labels), 3)
    assert top_k_dims(x, labels, 3).tolist() == torch.nonzero(~mask).ravel().tolist()


def test_sparse_probing_names_and_a_class_signal():
    """k = 1 on the dimension that carries the class beats chance by far; the SAE and
    model readings are both there."""
    x_tr, y_tr = _task(400, 12, 2, 5)
    x_ev, y_ev = _task(200, 12, 2, 6)
    out = sparse_probing((sp.csr_matrix(x_tr), sp.csr_matrix(x_ev)), (x_tr, x_ev), (y_tr, y_ev))
    assert set(out) == {f"{r}_top_{k}_accuracy" for r in ("sae", "llm") for k in (1, 2, 5)}
    assert out["llm_top_1_accuracy"] > 0.8
    assert out["sae_top_1_accuracy"] == pytest.approx(out["llm_top_1_accuracy"])
