"""BatchTopK, JumpReLU and Matryoshka: their gradients against dense autograd references
written out here, BatchTopK's batch selection and inference threshold and Matryoshka's
prefix losses on hand cases, checkpoints, and a fit of each."""

import pytest
import torch

from sae_ray.sae.architectures import (
    BANDWIDTH,
    JumpReLU,
    Step,
    batch_topk,
    levels,
    prefix_reconstructions,
)
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.trainer import fit_in_process
from sae_ray.sae.training import DeadTracker, sae_loss


def _sae(arch, d=6, n=24, k=3, **kw):
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(d, n, k, architecture=arch, **kw))


def _x(rows=10, d=6, seed=1):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _straight_through_step(pre, theta, eps):
    """H(pre − θ) whose θ-gradient is −(1/ε)·rect((pre − θ)/ε), from plain autograd: a ramp
    of width ε around θ carries the gradient, the exact step its value."""
    ramp = 1 - ((theta - pre.detach()) / eps + 0.5).clamp(0, 1)
    return (pre > theta).to(pre).detach() + ramp - ramp.detach()


def test_jumprelu_gradients_match_a_dense_autograd_reference():
    pre = torch.tensor([[0.30, 0.1004, -0.2], [0.1, 0.0998, 0.5]], requires_grad=True)
    theta = torch.tensor([0.2, 0.1, 0.1], requires_grad=True)
    eps, upstream = 0.001, torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]])
    (JumpReLU.apply(pre, theta, eps) * upstream).sum().backward()
    (Step.apply(pre, theta, eps) * upstream).sum().backward()
    ours = pre.grad.clone(), theta.grad.clone()
    pre.grad, theta.grad = None, None
    h = _straight_through_step(pre, theta, eps)
    # the paper's z = pre·H, whose θ-gradient reads θ for pre inside the window (SAELens)
    z = pre * h.detach() + theta * (h - h.detach())
    ((z + h) * upstream).sum().backward()
    torch.testing.assert_close(ours[0], pre.grad)
    torch.testing.assert_close(ours[1], theta.grad)
    assert ours[1][1] != 0  # 0.1004 and 0.0998 sit inside the window around 0.1


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka", "jumprelu"])
def test_a_training_step_matches_a_dense_reference(arch):
    """The whole loss (FVU, Matryoshka's prefixes, JumpReLU's L0) and every parameter's
    gradient, against the architecture written densely in a few lines."""
    sae, x = _sae(arch, l0_coefficient=0.05), _x()
    sae.init_b_dec(x)
    tracker = DeadTracker(torch.zeros(24, dtype=torch.long), window=10**9)
    loss, _ = sae_loss(sae, sae, x, tracker, auxk_alpha=0.0)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    w_enc, b_enc, w_dec, b_dec = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
    pre = (x - b_dec) @ w_enc.T + b_enc
    var = (x - x.mean(0)).pow(2).sum()
    if arch == "jumprelu":
        theta = sae.log_threshold.exp()
        eps = BANDWIDTH * float(sae.input_scale)
        h = _straight_through_step(pre, theta, eps)
        z = pre * h.detach() + theta * (h - h.detach())
        ref = (x - z @ w_dec - b_dec).pow(2).sum() / var + 0.05 * h.sum() / len(x)
    else:
        cut = pre.relu().flatten().topk(3 * len(x)).values[-1]
        z = pre.relu() * (pre.relu() >= cut)
        widths = [3, 6, 12, 24] if arch == "matryoshka" else [24]
        ref = sum((x - z[:, :m] @ w_dec[:m] - b_dec).pow(2).sum() for m in widths)
        ref = ref / len(widths) / var
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)


def test_batch_topk_selects_over_the_batch_and_infers_by_threshold():
    pre = torch.tensor([[5.0, 4.0, -1.0], [0.5, 3.0, 0.2]])
    # k = 1 over 2 rows: the two largest of the batch, both may sit in one row
    assert batch_topk(pre, 1).tolist() == [[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]]
    sae = _sae("batchtopk", d=2, n=3, k=1)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    sae.train()
    sae.encode(x)  # the first batch sets θ: its smallest selected activation
    pre_x = sae.encoder(x - sae.b_dec).detach()
    assert float(sae.threshold) == pytest.approx(
        float(batch_topk(pre_x, 1)[batch_topk(pre_x, 1) > 0].min())
    )
    sae.threshold.fill_(0.25)
    sae.eval()
    codes = sae.encode(x)
    expected = pre_x.relu() * (pre_x > 0.25)
    torch.testing.assert_close(codes.dense, expected)
    dense = torch.zeros_like(expected).scatter(1, codes.indices, codes.values)
    torch.testing.assert_close(dense, expected)  # the padded codes say the same
    sae.train()
    sae.encode(x)  # later batches move it by the rate: θ ← 0.99 θ + 0.01 min
    low = float(batch_topk(pre_x, 1)[batch_topk(pre_x, 1) > 0].min())
    assert float(sae.threshold) == pytest.approx(0.99 * 0.25 + 0.01 * low)


def test_matryoshka_prefixes_reconstruct_from_their_first_latents():
    sae = _sae("matryoshka", d=2, n=4, k=1, matryoshka_widths=[1, 2])
    assert levels(sae) == [1, 2, 4]
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    z = torch.tensor([[1.0, 2.0, 3.0, 0.5]])
    parts = [p.tolist() for p in prefix_reconstructions(sae, z)]
    assert parts == [[[1.5, -0.5]], [[1.5, 1.5]], [[5.5, 4.5]]]


@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu", "matryoshka"])
def test_each_architecture_learns_and_round_trips_its_checkpoint(tmp_path, arch):
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(64, 16, generator=gen)
    x = (torch.rand(6000, 64, generator=gen) * (torch.rand(6000, 64, generator=gen) < 0.05)) @ basis
    cfg = SaeTrainConfig(
        hookpoints=["h"],
        d_in=16,
        k=4,
        expansion_factor=4,
        batch_size=256,
        epochs=2,
        progress=False,
        architecture=arch,
        l0_coefficient=1e-3,
    )
    result = fit_in_process({"h": x}, cfg, tmp_path)
    assert result.metrics["fvu/h"] < 0.5, result.metrics
    loaded = SparseAutoencoder.load(tmp_path / "h")
    assert loaded.cfg.architecture == arch and not loaded.training
    trained = result.saes["h"].eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.dense_codes(x[:50]), trained.dense_codes(x[:50]))
        x_hat, codes = loaded(x[:500])
    fvu = (x[:500] - x_hat).pow(2).sum() / (x[:500] - x[:500].mean(0)).pow(2).sum()
    assert fvu < 0.6 and (codes.values > 0).sum(-1).float().mean() > 0
    if arch != "jumprelu":
        assert float(loaded.threshold) > 0  # the inference threshold was learned


def test_matryoshka_widths_are_checked_against_k_and_the_dictionary():
    base = dict(hookpoints=["h"], d_in=8, k=4, expansion_factor=4, architecture="matryoshka")
    for widths in ([2, 16], [16, 8], [8, 32]):
        with pytest.raises(ValueError, match="matryoshka_widths"):
            SaeTrainConfig(**base, matryoshka_widths=widths)
    assert SaeTrainConfig(**base, matryoshka_widths=[4, 16]).matryoshka_widths == [4, 16]
