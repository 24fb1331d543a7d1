import numpy as np
import torch

from sae_ray.method.targets import class_masks, num_kept, random_targets, sharpen
from sae_ray.sae.model import SaeConfig, SparseAutoencoder


def _sae():
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(16, 40, 8))


def test_per_class_keeps_exactly_the_class_top_latents():
    sae = _sae()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((60, 16)).astype(np.float32)
    labels = np.repeat([0, 1, 2], 20)
    ids = np.arange(100, 160)
    table = sharpen("per_class", sae, ids, labels, x, 3, top_k_pct=10, seed=0)
    codes = sae.dense_codes(torch.from_numpy(x)).detach().numpy()
    keep = num_kept(40, 10)
    assert keep == 4
    masks = class_masks(codes, labels, 3, keep)
    hand = np.zeros_like(codes)  # the expectation built here, not with the module's helpers
    for c in range(3):
        top = np.argsort(-codes[labels == c].mean(0))[:keep]
        assert set(np.flatnonzero(masks[c])) == set(top)
        members = np.flatnonzero(labels == c)
        hand[np.ix_(members, top)] = codes[np.ix_(members, top)]
    w_dec, b_dec = sae.W_dec.detach().numpy(), sae.b_dec.detach().numpy()
    want = hand @ w_dec + b_dec  # x_hat = z W_dec + b_dec, written out
    np.testing.assert_allclose(table.lookup(ids).numpy(), want, rtol=1e-5, atol=1e-6)


def test_random_is_seeded_and_ignores_the_sae():
    ids = np.arange(50)
    a = random_targets(ids, 16, seed=3)
    np.testing.assert_array_equal(a, random_targets(ids, 16, seed=3))
    assert not np.allclose(a, random_targets(ids, 16, seed=4))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    table = sharpen(
        "random", None, ids[::-1].copy(), np.zeros(50, int), np.zeros((50, 16)), 2, 10, seed=3
    )
    np.testing.assert_allclose(table.lookup(ids).numpy(), a)


def test_none_has_no_targets():
    assert (
        sharpen("none", _sae(), np.arange(3), np.zeros(3, int), np.zeros((3, 16)), 2, 10, 0) is None
    )


def test_per_class_complement_drops_exactly_the_class_top_latents():
    sae = _sae()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 16)).astype(np.float32)
    labels = np.repeat([0, 1], 20)
    ids = np.arange(40)
    table = sharpen("per_class_complement", sae, ids, labels, x, 2, top_k_pct=10, seed=0)
    codes = sae.dense_codes(torch.from_numpy(x)).detach().numpy()
    dropped = class_masks(codes, labels, 2, num_kept(40, 10))[labels]
    want = sae.decode_dense(torch.from_numpy(codes * ~dropped)).detach()
    torch.testing.assert_close(table.lookup(ids), want)
    kept = sharpen("per_class", sae, ids, labels, x, 2, top_k_pct=10, seed=0).lookup(ids)
    full = sae.decode_dense(torch.from_numpy(codes)).detach()
    torch.testing.assert_close(kept + table.lookup(ids), full + sae.b_dec.detach())  # a split


def test_per_example_warns_when_it_keeps_k_or_more_latents(caplog):
    sae = _sae()  # 40 latents, k = 8
    x = np.random.default_rng(2).standard_normal((10, 16)).astype(np.float32)
    args = (np.arange(10), np.zeros(10, int), x, 2)
    with caplog.at_level("WARNING", logger="sae_ray.method.targets"):
        sharpen("per_example", sae, *args, top_k_pct=10, seed=0)  # keeps 4 < 8: sharpens
        assert not caplog.records
        table = sharpen("per_example", sae, *args, top_k_pct=20, seed=0)  # keeps 8 = k
    assert "changes nothing" in caplog.records[0].getMessage()
    torch.testing.assert_close(  # and indeed: the target is the SAE's own reconstruction
        table.lookup(np.arange(10)), sae(torch.from_numpy(x))[0].detach()
    )
