import numpy as np
from sklearn.metrics import mutual_info_score

from sae_ray.evaluate import interp_u, uncertainty_coefficients


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
