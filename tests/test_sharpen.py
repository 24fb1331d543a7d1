import itertools

import numpy as np
import pytest
import torch

from sae_ray.config import Sharpening
from sae_ray.method.seeds import stream
from sae_ray.method.targets import random_targets, sharpen, target_metrics
from sae_ray.sae.model import SaeConfig, SparseAutoencoder

PCT10 = Sharpening(top_k_pct=10)  # the seed repo's rule: 10 % of 40 latents = 4
HALF = Sharpening()  # the default: half of each example's k = 8 active latents


def _sae():
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(16, 40, 8))


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)


def _codes(sae, x) -> np.ndarray:
    return sae.dense_codes(torch.from_numpy(x)).detach().numpy()


def _decode(sae, codes) -> np.ndarray:
    w_dec, b_dec = sae.W_dec.detach().numpy(), sae.b_dec.detach().numpy()
    return codes @ w_dec + b_dec  # x_hat = z W_dec + b_dec, written out


def _run(strategy, sae, x, labels, rule=HALF, seed=0, ids=None, **kwargs):
    ids = np.arange(len(x)) if ids is None else ids
    classes = int(labels.max()) + 1
    return sharpen(strategy, sae, ids, labels, x, classes, rule, seed, cycle=0, **kwargs)


@pytest.mark.parametrize("rule,keep", [(PCT10, 4), (HALF, 4), (Sharpening(keep_frac=0.25), 2)])
def test_per_class_keeps_exactly_the_class_top_latents(rule, keep):
    sae, x = _sae(), _x(60)
    labels = np.repeat([0, 1, 2], 20)
    ids = np.arange(100, 160)
    made = _run("per_class", sae, x, labels, rule, ids=ids)
    codes = _codes(sae, x)
    hand = np.zeros_like(codes)  # the expectation built here, not with the module's helpers
    for c in range(3):
        top = np.argsort(-codes[labels == c].mean(0), kind="stable")[:keep]
        members = np.flatnonzero(labels == c)
        hand[np.ix_(members, top)] = codes[np.ix_(members, top)]
    np.testing.assert_allclose(made.table.lookup(ids).numpy(), _decode(sae, hand), atol=1e-5)
    assert made.kept_latents == pytest.approx((hand > 0).sum(1).mean())


def test_per_example_keeps_each_codes_strongest_half():
    sae, x = _sae(), _x(30, 3)
    made = _run("per_example", sae, x, np.zeros(30, int))
    codes = _codes(sae, x)
    hand = np.zeros_like(codes)
    for row in range(30):
        top = np.argsort(-codes[row])[:4]  # keep_frac 0.5 of k = 8
        hand[row, top] = codes[row, top]
    got = made.table.lookup(np.arange(30)).numpy()
    np.testing.assert_allclose(got, _decode(sae, hand), atol=1e-5)
    assert made.kept_latents == pytest.approx((hand > 0).sum(1).mean()) and made.kept_latents <= 4


def test_per_class_complement_and_per_class_split_the_reconstruction():
    sae, x = _sae(), _x(40, 1)
    labels, ids = np.repeat([0, 1], 20), np.arange(40)
    dropped = _run("per_class_complement", sae, x, labels).table.lookup(ids)
    kept = _run("per_class", sae, x, labels).table.lookup(ids)
    full = torch.from_numpy(_decode(sae, _codes(sae, x)))
    b_dec = sae.b_dec.detach()
    torch.testing.assert_close(kept + dropped, full + b_dec, atol=1e-5, rtol=1e-5)


def test_centroid_is_the_class_mean_of_the_models_own_activations():
    x, labels = _x(9, 4), np.array([0, 1, 2, 0, 1, 2, 0, 0, 1])
    made = _run("centroid", None, x, labels)
    for row in range(9):
        want = x[labels == labels[row]].mean(0)
        got = made.table.lookup(np.array([row]))[0].numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert made.kept_latents is None


def test_shuffled_is_the_sharpened_targets_permuted_across_examples():
    sae, x = _sae(), _x(50, 5)
    labels, ids = np.repeat([0, 1], 25), np.arange(50)
    sharp = _run("per_example", sae, x, labels).table.lookup(ids).numpy()
    of = {"shuffle_of": "per_example"}
    shuffled = _run("shuffled", sae, x, labels, seed=7, **of).table.lookup(ids).numpy()
    # the same rows (the same target distribution), paired with other examples
    order = [int(np.flatnonzero((sharp == row).all(1))[0]) for row in shuffled]
    assert sorted(order) == list(range(50))
    assert sum(i != j for i, j in enumerate(order)) > 40
    of_class = _run("shuffled", sae, x, labels, seed=7).table.lookup(ids).numpy()  # default
    per_class = _run("per_class", sae, x, labels).table.lookup(ids).numpy()
    np.testing.assert_array_equal(np.sort(of_class, 0), np.sort(per_class, 0))
    again = _run("shuffled", sae, x, labels, seed=7, **of).table.lookup(ids).numpy()
    np.testing.assert_array_equal(again, shuffled)  # seeded


def test_random_is_seeded_and_ignores_the_sae():
    ids = np.arange(50)
    a = random_targets(ids, 16, seed=3)
    np.testing.assert_array_equal(a, random_targets(ids, 16, seed=3))
    assert not np.allclose(a, random_targets(ids, 16, seed=4))
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, rtol=1e-5)
    made = _run("random", None, np.zeros((50, 16), np.float32), np.zeros(50, int), seed=3)
    b = made.table.lookup(ids).numpy()
    np.testing.assert_allclose(b, random_targets(ids, 16, stream(3, 0, "random_targets")))


def test_none_has_no_targets():
    assert _run("none", _sae(), _x(3), np.zeros(3, int)).table is None


def test_a_keep_that_cannot_change_the_targets_is_refused_naming_its_field():
    with pytest.raises(ValueError, match=r"^sharpening.keep_frac: keeps 8 latents of k=8"):
        Sharpening(strategy="per_example", keep_frac=1.0).check_changes_targets(8, 40)
    with pytest.raises(ValueError, match=r"^sharpening.top_k_pct: keeps 8 latents of k=8"):
        Sharpening(strategy="per_example", top_k_pct=20).check_changes_targets(8, 40)
    with pytest.raises(ValueError, match=r"^sharpening.top_k_pct: keeps 40 latents of the 40"):
        Sharpening(strategy="per_class", top_k_pct=100).check_changes_targets(8, 40)
    Sharpening(strategy="per_example").check_changes_targets(8, 40)  # 4 of 8: sharpens
    Sharpening(strategy="shuffled", keep_frac=1.0).check_changes_targets(8, 40)  # re-paired
    with pytest.raises(ValueError, match="two rules"):
        Sharpening(keep_frac=0.5, top_k_pct=10)


def test_target_metrics_say_how_far_the_targets_are_from_the_reconstruction():
    sae, x = _sae(), _x(40, 6)
    labels, ids = np.zeros(40, int), np.arange(40)
    whole = Sharpening.model_construct(strategy="per_example", keep_frac=1.0, top_k_pct=None)
    same = target_metrics(_run("per_example", sae, x, labels, whole).table, sae, ids, x)
    assert same["targets/recon_cos"] == pytest.approx(1.0, abs=1e-5)  # it changes nothing
    half = _run("per_example", sae, x, labels).table
    sharpened = target_metrics(half, sae, ids, x)
    assert sharpened["targets/recon_cos"] < 0.99
    t = half.lookup(ids).numpy().astype(np.float64)
    cos = (x * t).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(t, axis=1))
    assert sharpened["targets/initial_aux"] == pytest.approx(float((1 - cos).mean()), rel=1e-5)


def test_seeds_and_cycles_never_share_a_random_stream():
    purposes = ("init", "finetune", "sae", "random_targets", "shuffle")
    drawn = [stream(s, c, p) for s, c, p in itertools.product(range(4), range(4), purposes)]
    assert len(set(drawn)) == len(drawn)  # seed s at cycle 1 is not seed s+1 at cycle 0
    assert stream(0, 1, "sae") == stream(0, 1, "sae")


def _varying_sae(arch: str):
    """An SAE whose rows fire different numbers of latents at inference: BatchTopK's
    threshold, or JumpReLU's per-latent thresholds, set inside the pre-activations' range."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(16, 40, 4, architecture=arch)).eval()
    with torch.no_grad():
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.linspace(-1.5, 0.5, 40))
        else:
            sae.threshold.fill_(0.6)
    return sae


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "matryoshka"])
def test_codes_of_a_varying_l0_sae_are_its_dense_codes_however_batched(arch, monkeypatch):
    """Evaluation and sharpening read each row's active latents padded to the widest row
    (not k), whatever width each encoding batch had."""
    from sae_ray.method import evaluate

    sae, x = _varying_sae(arch), _x(50, 5)
    dense = _codes(sae, x)
    l0 = (dense > 0).sum(1)
    assert l0.min() < sae.cfg.k < l0.max()  # rows below and above k
    monkeypatch.setattr(evaluate, "BATCH_ELEMENTS", 7 * 40)  # batches of 7 rows, widths vary
    values, indices = evaluate.active_codes(sae, x)
    assert values.shape == (50, l0.max())
    rebuilt = np.zeros_like(dense)
    rows = np.nonzero(values > 0)[0]
    rebuilt[rows, indices[values > 0]] = values[values > 0]  # padded slots hold 0
    np.testing.assert_allclose(rebuilt, dense, atol=1e-5)  # batches of another size
    np.testing.assert_allclose(evaluate.sparse_codes(sae, x).toarray(), rebuilt)


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_per_example_keeps_half_of_each_rows_own_active_latents(arch):
    sae, x = _varying_sae(arch), _x(30, 3)
    made = _run("per_example", sae, x, np.zeros(30, int))
    codes = _codes(sae, x)
    hand = np.zeros_like(codes)
    for row in range(30):
        keep = max(1, int(0.5 * (codes[row] > 0).sum()))  # keep_frac of this row's L0
        top = np.argsort(-codes[row])[:keep]
        hand[row, top] = codes[row, top]
    np.testing.assert_allclose(
        made.table.lookup(np.arange(30)).numpy(), _decode(sae, hand), atol=1e-5
    )
    assert made.kept_latents == pytest.approx((hand > 0).sum(1).mean())


def test_per_class_of_a_varying_l0_sae_keeps_what_an_example_keeps_on_average():
    sae, x = _varying_sae("batchtopk"), _x(60, 4)
    labels = np.repeat([0, 1, 2], 20)
    made = _run("per_class", sae, x, labels)
    codes = _codes(sae, x)
    per_row = np.maximum(1, (0.5 * (codes > 0).sum(1)).astype(int))
    keep = round(per_row.mean())
    hand = np.zeros_like(codes)
    for c in range(3):
        top = np.argsort(-codes[labels == c].mean(0), kind="stable")[:keep]
        members = np.flatnonzero(labels == c)
        hand[np.ix_(members, top)] = codes[np.ix_(members, top)]
    np.testing.assert_allclose(
        made.table.lookup(np.arange(60)).numpy(), _decode(sae, hand), atol=1e-5
    )


def test_recon_cos_is_taken_about_b_dec_whatever_the_activations_mean():
    """The audit's case: a random SAE (d 64, k 16), per_class. Both the target and the
    reconstruction contain b_dec (about the activations' mean), so the raw cosine reads
    near 1 whatever sharpening did (.216 at zero mean, .80 at |mean|/|dev| 1.2, .96 at 3);
    the centred one does not move."""
    torch.manual_seed(0)
    sae = SparseAutoencoder(SaeConfig(64, 256, 16))
    dev = np.random.default_rng(0).standard_normal((200, 64)).astype(np.float32)
    labels, ids = np.repeat([0, 1, 2, 3], 50), np.arange(200)
    mean = np.random.default_rng(1).standard_normal(64).astype(np.float32)
    mean *= 3.0 * np.linalg.norm(dev, axis=1).mean() / np.linalg.norm(mean)
    with torch.no_grad():
        sae.b_dec.zero_()
    at_zero = target_metrics(_run("per_class", sae, dev, labels).table, sae, ids, dev)
    x = dev + mean
    with torch.no_grad():
        sae.b_dec.copy_(torch.from_numpy(mean))  # the same codes of x − b_dec
    table = _run("per_class", sae, x, labels).table
    shifted = target_metrics(table, sae, ids, x)
    assert shifted["targets/recon_cos"] == pytest.approx(at_zero["targets/recon_cos"], abs=1e-4)
    assert at_zero["targets/recon_cos"] < 0.5
    recon = sae(torch.from_numpy(x))[0].detach().numpy().astype(np.float64)
    t = table.lookup(ids).numpy().astype(np.float64)
    raw = (t * recon).sum(1) / (np.linalg.norm(t, axis=1) * np.linalg.norm(recon, axis=1))
    assert raw.mean() > 0.9  # what the uncentred figure read


def test_centred_targets_carry_their_centre_and_random_ones_move_about_it():
    sae, x = _sae(), _x(40, 2) + 5.0
    labels, ids = np.repeat([0, 1], 20), np.arange(40)
    made = _run("per_class", sae, x, labels, centered=True).table
    np.testing.assert_allclose(made.center.numpy(), x.mean(0), rtol=1e-5)
    assert _run("per_class", sae, x, labels).table.center is None
    rand = _run("random", None, x, labels, seed=3, centered=True).table
    unit = random_targets(ids, 16, stream(3, 0, "random_targets"))
    np.testing.assert_allclose(rand.lookup(ids).numpy() - x.mean(0), unit, atol=1e-5)
