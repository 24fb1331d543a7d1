import numpy as np
import pytest
from sklearn.metrics import mutual_info_score

from sae_ray.method.evaluate import interp_u, uncertainty_coefficients


def test_u_is_one_for_the_label_and_zero_for_independent_noise():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20000)
    fires = np.stack([labels == 1, rng.random(20000) < 0.5], axis=1)
    u = uncertainty_coefficients(fires, labels, 2)
    assert abs(u[0] - 1) < 1e-9
    assert u[1] < 1e-3


def test_u_matches_sklearn_mutual_information():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 5000)
    fires = (rng.random((5000, 6)) < 0.2) | (labels[:, None] == np.arange(6)[None] % 4)
    u = uncertainty_coefficients(fires, labels, 4)
    p = np.bincount(labels) / len(labels)
    h_y = -(p * np.log(p)).sum()
    for j in range(6):
        assert abs(u[j] - mutual_info_score(labels, fires[:, j]) / h_y) < 1e-9


def test_interp_u_averages_alive_latents_only():
    labels = np.array([0, 1] * 50)
    codes = np.zeros((100, 4))
    codes[:, 0] = labels  # fires exactly on class 1
    out = interp_u(codes, labels, 2)
    assert out["u"] == 1.0 and out["alive_frac"] == 0.25
    assert out["u_null"] < 0.05 and out["u_excess"] == out["u"] - out["u_null"]


def test_u_null_of_label_independent_codes_is_within_noise_of_u():
    """At the synthetic task's validation size, latents that ignore the labels still score
    U > 0 (the small-n bias); the permuted-label null measures the same bias."""
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 4, 120)
    codes = (rng.random((120, 64)) < rng.uniform(0.02, 0.5, 64)).astype(float)
    out = interp_u(codes, labels, 4, seed=1)
    assert out["u"] > 0.005  # biased upward although no latent knows the labels
    assert abs(out["u_excess"]) < 0.25 * out["u"]
    informative = codes.copy()
    informative[:, :16] = labels[:, None] == np.arange(16)[None] % 4
    assert interp_u(informative, labels, 4, seed=1)["u_excess"] > 0.08  # 16 of 64 at U 0.4


def test_f1_macro_matches_sklearn():
    from sklearn.metrics import f1_score

    from sae_ray.method.evaluate import f1_macro

    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 3, 300), rng.integers(0, 3, 300)
    assert f1_macro(p, y, 3) == f1_score(y, p, average="macro")


def test_class_selectivity_hand_computed():
    from sae_ray.method.evaluate import class_selectivity

    labels = np.array([0, 0, 1, 1, 2, 2])
    only_class0 = np.array([2.0, 2.0, 0, 0, 0, 0])  # μ_max 2, μ_rest 0 -> 1
    flat = np.ones(6)  # μ_max = μ_rest -> 0
    half = np.array([3.0, 3.0, 1.0, 1.0, 1.0, 1.0])  # (3 - 1) / (3 + 1) = 0.5
    for col, want in ((only_class0, 1.0), (flat, 0.0), (half, 0.5)):
        assert abs(class_selectivity(col[:, None], labels, 3) - want) < 1e-12
    both = np.stack([only_class0, half], axis=1)
    assert abs(class_selectivity(both, labels, 3) - 0.75) < 1e-12  # mean over units


def test_cluster_metrics_match_sklearn_and_find_separated_classes():
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    from sae_ray.method.evaluate import cluster_metrics

    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(3), 50)
    x = rng.standard_normal((150, 4)) * 0.1 + np.eye(4)[labels] * 5
    out = cluster_metrics(x, labels, 3)
    assert out["ari"] == 1.0  # well-separated blobs: k-means finds the classes exactly
    assert abs(out["silhouette"] - silhouette_score(x, labels)) < 1e-9
    assert abs(out["davies_bouldin"] - davies_bouldin_score(x, labels)) < 1e-9
    assert abs(out["calinski_harabasz"] - calinski_harabasz_score(x, labels)) < 1e-6
    noise = cluster_metrics(rng.standard_normal((150, 4)), labels, 3)
    assert abs(noise["ari"]) < 0.1


def test_sparse_probe_picks_the_informative_latent():
    from sae_ray.method.evaluate import interp_metrics

    rng = np.random.default_rng(4)

    def codes(labels):
        x = rng.random((len(labels), 40)) * (rng.random((len(labels), 40)) < 0.3)
        x[:, 17] = (labels == 1) * rng.uniform(1, 2, len(labels))  # the one informative latent
        return x

    y_tr, y_ev = rng.integers(0, 2, 600), rng.integers(0, 2, 300)
    out = interp_metrics((codes(y_tr), y_tr), (codes(y_ev), y_ev), 2)
    assert out["sparse_probe_accuracy@1"] == 1.0  # latent 17 chosen by U on train
    assert out["probe_accuracy"] > 0.95
    assert 0 < out["u"] < 1 and 0 < out["csi"] < 1
    dense = interp_metrics((codes(y_tr), y_tr), (codes(y_ev), y_ev), 2, dense=True)
    assert "sparse_probe_accuracy@1" not in dense and dense["probe_accuracy"] > 0.95


def test_a_cycles_evaluation_reports_every_metric(tmp_path, topics):
    """The cycle's evaluation on real extracted activations: every documented name, finite."""
    import math

    import torch

    from sae_ray.config import Config
    from sae_ray.lm.extraction import extract
    from sae_ray.lm.models import build_classifier, hookpoint
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder
    from sae_ray.storage.artifacts import Artifact
    from sae_ray.trial.evaluation import classifier_metrics

    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, seed=0, max_length=32)
    for split in ("train", "validation", "test"):
        extract(clf, topics.splits[split], -1, tmp_path / split, 32, tokens=split != "test")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(64, 256, 8))
    cfg = Config.model_validate({"experiment": {"name": "t"}, "model": {"max_length": 32}})
    acts, hp = Artifact(str(tmp_path), "k"), hookpoint(clf.model, -1)
    out = classifier_metrics(cfg, topics, clf, sae, acts, hp)
    names = ["accuracy", "f1_macro"]
    interp = ["u", "alive_frac", "csi", "ari", "silhouette", "davies_bouldin"]
    interp += ["calinski_harabasz", "probe_accuracy"]
    sparse = [f"sparse_probe_accuracy@{k}" for k in (1, 5, 25)]
    want = [f"{s}/{n}" for s in ("val", "test") for n in names]
    want += [f"{h}{kind}/{n}" for h in ("", "test/") for kind in ("interp", "base") for n in interp]
    want += [f"{h}interp/{n}" for h in ("", "test/") for n in sparse]
    want += [f"sae/{n}" for n in ("fvu", "explained_variance", "l0", "dead_pct", "l2_ratio")]
    want += [f"features/{n}" for n in ("firing_gini", "mean_max_decoder_cos", "decoder_silhouette")]
    probes = [f"{r}_top_{k}_accuracy" for r in ("sae", "llm") for k in (1, 2, 5)]
    want += [f"{h}saebench/{n}" for h in ("", "test/") for n in probes]
    for name in want:
        assert name in out and math.isfinite(out[name]), name
    # absorption runs on the tiny model's tokens (its value means nothing there)
    assert {"absorption/mean_fraction", "absorption/full_rate"} <= set(out)
    assert out["absorption/letters"] >= 0
    # and the values are what they claim, computed here another way
    from sklearn.metrics import accuracy_score, f1_score

    from sae_ray.lm.extraction import load_tokens
    from sae_ray.method.finetune import predict

    for split, prefix in (("validation", "val"), ("test", "test")):
        y = topics.splits[split].labels
        pred = predict(clf, topics.splits[split], 32)
        assert out[f"{prefix}/accuracy"] == accuracy_score(y, pred)
        f1 = f1_score(y, pred, average="macro", labels=range(4), zero_division=0)
        assert out[f"{prefix}/f1_macro"] == pytest.approx(f1)
    x = torch.from_numpy(load_tokens(tmp_path / "validation" / "tokens", hookpoint(clf.model, -1)))
    with torch.no_grad():
        x_hat, codes = sae(x)
    residual = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert out["sae/fvu"] == pytest.approx(residual.item(), rel=1e-4)
    assert out["sae/l0"] == pytest.approx((codes.values > 0).sum(-1).float().mean().item())
    assert 0 < out["sae/l0"] <= 8  # TopK keeps at most k


def _blob_codes(seed: int, n: int, sae):
    """Rows of 4 noisy classes and their SAE codes, sparse and dense."""
    import torch

    from sae_ray.method.evaluate import sparse_codes

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    centers = np.random.default_rng(99).standard_normal((4, sae.cfg.d_in)) * 2
    x = (centers[labels] + rng.standard_normal((n, sae.cfg.d_in))).astype(np.float32)
    sparse = sparse_codes(sae, x)
    with torch.no_grad():
        dense = sae.dense_codes(torch.from_numpy(x)).numpy()
    return sparse, dense, labels, x


def test_sparse_codes_give_every_metric_the_dense_reference_gives():
    """Evaluation on CSR codes (memory O(n·k)) against the same functions on the dense
    code matrix (sklearn's own Davies-Bouldin and Calinski-Harabasz among them)."""
    import torch

    from sae_ray.method.evaluate import interp_metrics, sae_quality
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder

    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(16, 96, 6))
    sp_tr, de_tr, y_tr, _ = _blob_codes(1, 400, sae)
    sp_ev, de_ev, y_ev, x_ev = _blob_codes(2, 250, sae)
    assert np.array_equal(sp_tr.toarray(), de_tr) and sp_tr.nnz <= 6 * 400
    sparse = interp_metrics((sp_tr, y_tr), (sp_ev, y_ev), 4)
    dense = interp_metrics((de_tr, y_tr), (de_ev, y_ev), 4)
    assert sparse.keys() == dense.keys() and len(sparse) == 16
    for name, value in dense.items():
        assert sparse[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
    streamed = sae_quality(sae, (x_ev[i : i + 64] for i in range(0, len(x_ev), 64)))
    whole = sae_quality(sae, x_ev)
    x = torch.from_numpy(x_ev)
    with torch.no_grad():
        x_hat, _ = sae(x)
    reference = (((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item()
    assert streamed == pytest.approx(whole) and whole["fvu"] == pytest.approx(reference, rel=1e-5)
    ratio = (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item()  # SAEBench's l2_ratio
    assert whole["l2_ratio"] == pytest.approx(ratio, rel=1e-5)


def test_the_l2_ratio_on_hand_cases():
    """An SAE that halves every input reads 0.5; rows of norm 0 are left out."""
    import torch

    from sae_ray.method.evaluate import sae_quality
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder

    sae = SparseAutoencoder(SaeConfig(4, 4, 4))
    with torch.no_grad():  # z = relu(x), x̂ = z / 2 on non-negative rows
        sae.encoder.weight.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4) / 2)
    x = np.array([[1.0, 2, 0, 0], [0, 0, 3, 4], [0, 0, 0, 0]], dtype=np.float32)
    assert sae_quality(sae, x)["l2_ratio"] == pytest.approx(0.5)


def test_probes_on_codes_scale_without_centering_and_find_the_same_probe():
    """Codes are scaled, not centered (centering would make them dense): the unpenalized
    intercept absorbs the shift, so accuracy matches the centered probe."""
    import torch

    from sae_ray.method.evaluate import probe_accuracy
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder

    torch.manual_seed(1)
    sae = SparseAutoencoder(SaeConfig(16, 96, 6))
    _, tr, y_tr, _ = _blob_codes(3, 400, sae)
    _, ev, y_ev, _ = _blob_codes(4, 250, sae)
    centered = probe_accuracy(tr, y_tr, ev, y_ev, center=True)
    assert probe_accuracy(tr, y_tr, ev, y_ev, center=False) == pytest.approx(centered, abs=1 / 250)


MEMORY_PROBE = """
import resource, sys
import numpy as np, torch
from sae_ray.method.evaluate import interp_metrics, sae_quality, sparse_codes
from sae_ray.sae.model import SaeConfig, SparseAutoencoder

torch.manual_seed(0)
n, d, latents, k = 20000, 64, 16384, 32
rng = np.random.default_rng(0)
sae = SparseAutoencoder(SaeConfig(d, latents, k))
splits = []
for _ in range(2):
    y = rng.integers(0, 4, n)
    splits.append(((rng.standard_normal((n, d)) + y[:, None]).astype(np.float32), y))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
codes = [(sparse_codes(sae, x), y) for x, y in splits]
metrics = interp_metrics(codes[0], codes[1], 4)
quality = sae_quality(sae, splits[1][0])
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(grew // 1024, len(metrics), codes[0][0].nnz)
"""


def test_evaluation_of_20000_sequences_at_16384_latents_stays_under_300_mb():
    """One dense code matrix of this size is 1.3 GB (float32), per split; the sparse
    evaluation's peak memory grows by under 300 MB, measured in a fresh process."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grew_mb, names, nnz = map(int, done.stdout.split())
    assert names == 16 and nnz <= 20000 * 32
    assert grew_mb < 300, f"evaluation grew peak memory by {grew_mb} MB"
    print(f"peak memory growth: {grew_mb} MB")


def test_u_top_does_not_move_when_uninformative_latents_wake():
    """Mean U over the alive latents falls as label-free latents wake; U over the 16 most
    informative on train does not, and its null sits near 0."""
    from sae_ray.method.evaluate import interp_metrics

    def codes(n, noise, seed):
        r = np.random.default_rng(seed)
        y = np.arange(n) % 4
        signal = np.stack([(y == c) * r.uniform(0.5, 1, n) for c in range(4)], 1)
        signal = np.repeat(signal, 4, axis=1) * (r.random((n, 16)) < 0.9)  # 16 informative
        return np.hstack([signal, r.random((n, noise)) * (r.random((n, noise)) < 0.3)]), y

    few = interp_metrics(codes(400, 20, 1), codes(400, 20, 2), 4)
    many = interp_metrics(codes(400, 300, 1), codes(400, 300, 2), 4)
    assert many["u"] < 0.5 * few["u"]  # the mean over alive latents moves
    assert many["u_top"] == pytest.approx(few["u_top"], rel=1e-6)  # this one does not
    assert few["u_top_excess"] > 0.3 and abs(few["u_top_null"]) < 0.05
