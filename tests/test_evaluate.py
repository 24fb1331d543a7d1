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
    from sae_ray.method.cycle import _evaluate
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder
    from sae_ray.storage.artifacts import Artifact

    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, seed=0, max_length=32)
    for split in ("train", "validation", "test"):
        extract(clf, topics.splits[split], -1, tmp_path / split, 32, tokens=split != "test")
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(64, 256, 8))
    cfg = Config.model_validate({"experiment": {"name": "t"}, "model": {"max_length": 32}})
    out = _evaluate(cfg, topics, clf, sae, Artifact(str(tmp_path), "k"), hookpoint(clf.model, -1))
    names = ["accuracy", "f1_macro"]
    interp = ["u", "alive_frac", "csi", "ari", "silhouette", "davies_bouldin"]
    interp += ["calinski_harabasz", "probe_accuracy"]
    sparse = [f"sparse_probe_accuracy@{k}" for k in (1, 5, 25)]
    want = [f"{s}/{n}" for s in ("val", "test") for n in names]
    want += [f"{h}{kind}/{n}" for h in ("", "test/") for kind in ("interp", "base") for n in interp]
    want += [f"{h}interp/{n}" for h in ("", "test/") for n in sparse]
    want += [f"sae/{n}" for n in ("fvu", "explained_variance", "l0", "dead_pct", "absorption")]
    for name in want:
        assert name in out and math.isfinite(out[name]), name
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
