"""BatchTopK, JumpReLU and Matryoshka: their gradients against dense autograd references
written out here, BatchTopK's batch selection and inference threshold and Matryoshka's
prefix losses on hand cases, checkpoints, and a fit of each."""

import pytest
import torch

from sae_ray.sae.archs.jumprelu import BANDWIDTH, JumpReLU, Step
from sae_ray.sae.archs.matryoshka import levels, prefix_reconstructions
from sae_ray.sae.codes import Codes
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.trainer import fit_in_process
from sae_ray.sae.training import DeadTracker, sae_loss


def _sae(arch, d=6, n=24, k=3, **kw):
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(d, n, k, architecture=arch, **kw))


def _x(rows=10, d=6, seed=1):
    return torch.randn(rows, d, generator=torch.Generator().manual_seed(seed))


def _step(sae, x, tracker, auxk_alpha):
    """Our loss and gradients for one step, and what a dense reference starts from: the
    parameters (gradients cleared), the pre-activations and the batch's total variance."""
    loss, _ = sae_loss(sae, sae, x, tracker, auxk_alpha=auxk_alpha)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    params = sae.encoder.weight, sae.encoder.bias, sae.W_dec, sae.b_dec
    pre = (x - sae.b_dec) @ sae.encoder.weight.T + sae.encoder.bias
    return loss, grads, params, pre, (x - x.mean(0)).pow(2).sum()


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


@pytest.mark.parametrize(
    "arch, target",
    [("batchtopk", None), ("matryoshka", None), ("jumprelu", None), ("jumprelu", 2.0)],
)
def test_a_training_step_matches_a_dense_reference(arch, target):
    """The whole loss (FVU, Matryoshka's prefixes, JumpReLU's L0 or its quadratic penalty
    around a target L0) and every parameter's gradient, against the architecture written
    densely in a few lines."""
    sae, x = _sae(arch, l0_coefficient=0.05, target_l0=target), _x()
    sae.init_b_dec(x)
    tracker = DeadTracker(torch.zeros(24, dtype=torch.long), window=10**9)
    loss, ours, (w_enc, b_enc, w_dec, b_dec), pre, var = _step(sae, x, tracker, 0.0)
    if arch == "jumprelu":
        theta = sae.log_threshold.exp()
        eps = BANDWIDTH * float(sae.input_scale)
        h = _straight_through_step(pre, theta, eps)
        z = pre * h.detach() + theta * (h - h.detach())
        l0 = h.sum(-1)
        penalty = l0.sum() if target is None else (2 / target * (l0 - target) ** 2).sum()
        ref = (x - z @ w_dec - b_dec).pow(2).sum() / var + 0.05 * penalty / len(x)
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
    sae = _sae("batchtopk", d=2, n=3, k=1)
    with torch.no_grad():  # pre-activations [[5, 4, -1], [0.5, 3, 0.2]] for x = I
        sae.encoder.weight.copy_(torch.tensor([[5.0, 0.5], [4.0, 3.0], [-1.0, 0.2]]))
        sae.encoder.bias.zero_()
        sae.b_dec.zero_()
    x = torch.eye(2)
    sae.train()
    # k = 1 over 2 rows: the two largest of the batch, both may sit in one row (CSR codes)
    codes = sae.encode(x)
    assert codes.values.tolist() == [5.0, 4.0] and codes.indices.tolist() == [0, 1]
    assert codes.offsets.tolist() == [0, 2]
    assert sae.dense_codes(x).tolist() == [[5.0, 4.0, 0.0], [0.0, 0.0, 0.0]]
    assert sae(x)[0].tolist() == (sae.dense_codes(x) @ sae.W_dec).tolist()
    sae.threshold.zero_()
    sae.encode(x)  # the first batch sets θ: its smallest selected activation
    assert float(sae.threshold) == 4.0
    sae.threshold.fill_(0.25)
    sae.eval()
    codes = sae.encode(x)
    expected = torch.tensor([[5.0, 4.0, 0.0], [0.5, 3.0, 0.0]])  # pre > θ, ReLU'd
    torch.testing.assert_close(codes.dense, expected)
    dense = torch.zeros_like(expected).scatter(1, codes.indices, codes.values)
    torch.testing.assert_close(dense, expected)  # the padded codes say the same
    sae.train()
    sae.encode(x)  # later batches move it by the rate: θ ← 0.99 θ + 0.01 min
    assert float(sae.threshold) == pytest.approx(0.99 * 0.25 + 0.01 * 4.0)


def test_batch_topk_pick_equals_a_topk_over_the_whole_batch():
    """Picked among each row's 4k largest first; a row that holds all its candidates
    (here row 0, 5 of the batch's 5 with k = 1) falls back to the whole matrix."""
    from sae_ray.sae.archs.batchtopk import _batch_top

    def whole(pre, k):
        return sorted(pre.flatten().topk(k * len(pre)).indices.tolist())

    gen = torch.Generator().manual_seed(0)
    for rows, latents, k in ((64, 512, 8), (3, 40, 2), (200, 64, 16)):
        pre = torch.randn(rows, latents, generator=gen) * torch.rand(rows, 1, generator=gen) * 4
        assert _batch_top(k)(pre).tolist() == whole(pre, k)
    pre = torch.rand(5, 8, generator=gen)
    pre[0] += 10
    assert _batch_top(1)(pre).tolist() == whole(pre, 1)
    assert len(set(_batch_top(1)(pre).div(8, rounding_mode="floor").tolist())) == 1


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_sparse_batch_topk_with_auxk_matches_a_dense_reference(arch):
    """The CSR training path (selection, decode, sparse encoder backward, AuxK on the dead
    latents' top d/2) against the same step written densely with plain autograd."""
    sae, x = _sae(arch, d=8, n=32, k=3), _x(rows=12, d=8) * 2 + 0.5
    sae.init_b_dec(x)
    with torch.no_grad():
        sae.encoder.bias.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[1, 5, 9, 17, 20, 30]] = True
    tracker = DeadTracker(torch.zeros(32, dtype=torch.long), window=1)
    tracker.prev_fires, tracker.prev_tokens = (~dead).long() * 10, 10
    assert torch.equal(tracker.dead(), dead)
    loss, ours, (w_enc, b_enc, w_dec, b_dec), pre, var = _step(sae, x, tracker, 0.5)
    cut = pre.relu().flatten().topk(3 * len(x)).values[-1]
    z = pre.relu() * (pre.relu() >= cut)
    widths = [4, 8, 16, 32] if arch == "matryoshka" else [32]
    main = sum((x - z[:, :m] @ w_dec[:m] - b_dec).pow(2).sum() for m in widths) / len(widths)
    x_hat = z @ w_dec + b_dec
    dead_pre = pre[:, dead]  # k_aux = min(d/2, dead) = 4 of the 6 dead latents
    top = dead_pre.topk(4, dim=-1)
    aux_z = torch.zeros_like(dead_pre).scatter(1, top.indices, top.values.relu())
    e_hat = aux_z @ w_dec[dead]
    aux = min(6 / 4, 1.0) * ((x - x_hat).detach() - e_hat).pow(2).sum() / var
    ref = main / var + 0.5 * aux
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for name, p in sae.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, msg=name)


def test_matryoshka_prefixes_reconstruct_from_their_first_latents():
    sae = _sae("matryoshka", d=2, n=4, k=1, matryoshka_widths=[1, 2])
    assert levels(sae) == [1, 2, 4]
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0], [0, 1], [1, 1], [2, 0]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    # z = [[1, 2, 3, 0.5], [0, 0, 0, 0], [0, 4, 0, 0]] as CSR codes
    values, cols = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0]), torch.tensor([0, 1, 2, 3, 1])
    codes = Codes(values, cols, values[:0], cols[:0], offsets=torch.tensor([0, 4, 4]))
    parts = [p.tolist() for p in prefix_reconstructions(sae, codes)]
    assert parts[0] == [[1.5, -0.5], [0.5, -0.5], [0.5, -0.5]]
    assert parts[1] == [[1.5, 1.5], [0.5, -0.5], [0.5, 3.5]]
    assert parts[2] == [[5.5, 4.5], [0.5, -0.5], [0.5, 3.5]]


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


def test_a_jumprelu_with_a_target_l0_ends_near_it():
    """The quadratic penalty (and the thresholds' start) hold L0 near the target; the plain
    L0 penalty at its default weight leaves it where the data put it (29 of 64 here)."""
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(64, 16, generator=gen)
    x = (torch.rand(6000, 64, generator=gen) * (torch.rand(6000, 64, generator=gen) < 0.05)) @ basis
    l0 = {}
    for target in (None, 2.0, 8.0):
        cfg = SaeTrainConfig(
            hookpoints=["h"], d_in=16, k=4, expansion_factor=4, batch_size=256, epochs=2,
            progress=False, architecture="jumprelu", target_l0=target,
        )  # fmt: skip
        sae = fit_in_process({"h": x}, cfg, None).saes["h"].eval()
        with torch.no_grad():
            l0[target] = float((sae.dense_codes(x) > 0).sum(-1).float().mean())
    assert 1.5 < l0[2.0] < 4 and 6 < l0[8.0] < 10 and l0[None] > 16, l0


def test_matryoshka_widths_are_checked_against_k_and_the_dictionary():
    base = dict(hookpoints=["h"], d_in=8, k=4, expansion_factor=4, architecture="matryoshka")
    for widths in ([2, 16], [16, 8], [8, 32]):
        with pytest.raises(ValueError, match="matryoshka_widths"):
            SaeTrainConfig(**base, matryoshka_widths=widths)
    assert SaeTrainConfig(**base, matryoshka_widths=[4, 16]).matryoshka_widths == [4, 16]


@pytest.fixture
def relu_l1():
    """A test-only architecture, added the way a new one is: one class, `@register`ed.
    The standard ReLU SAE with an L1 penalty (Bricken et al. 2023), which SAELens calls
    "standard"."""
    import torch.nn.functional as F

    from sae_ray.sae.archs import ARCHITECTURES, Architecture, register
    from sae_ray.sae.codes import dense_codes

    @register
    class ReluL1(Architecture):
        name = "test_relu_l1"
        saelens_name = "standard"

        def encode(self, sae, x, dead):
            z = F.relu(F.linear(sae.centred(x), sae.encoder.weight, sae.encoder.bias))
            codes = dense_codes(z, sae.cfg.k)
            return codes._replace(penalty=z.sum()) if sae.training else codes

        def saelens(self, sae):
            return {}, {}

    yield ReluL1.name
    del ARCHITECTURES[ReluL1.name]


def test_a_registered_architecture_trains_saves_and_exports(relu_l1, tmp_path):
    from sae_ray.sae.export import export_saelens
    from sae_ray.sae.training import make_optimizer, train_step

    torch.manual_seed(0)
    basis = torch.randn(32, 16)
    x = (torch.rand(2048, 32) * (torch.rand(2048, 32) < 0.1)) @ basis
    sae = SparseAutoencoder(SaeConfig(16, 64, 4, architecture=relu_l1, l0_coefficient=1e-4))
    sae.init_b_dec(x[:256])
    opt = make_optimizer("adam", sae.parameters(), lr=3e-3)
    tracker = DeadTracker(torch.zeros(64, dtype=torch.long), window=10**9)
    fvus = [
        train_step(sae, sae, opt, x[i : i + 256], tracker, 0.0)["fvu"]
        for _ in range(15)
        for i in range(0, 2048, 256)
    ]
    assert fvus[-1] < 0.5 * fvus[0], fvus[::8]
    sae.save(tmp_path / "sae")
    again = SparseAutoencoder.load(tmp_path / "sae")
    torch.testing.assert_close(again(x[:64])[0], sae.eval()(x[:64])[0])
    export_saelens(again, tmp_path / "saelens")
    assert '"architecture": "standard"' in (tmp_path / "saelens" / "cfg.json").read_text()
    with pytest.raises(ValueError, match="target_l0"):  # the base class's config check
        SaeConfig(16, 64, 4, architecture=relu_l1, target_l0=3.0)


def test_the_schema_offers_every_registered_architecture():
    import typing

    from sae_ray.config import Sae
    from sae_ray.sae.archs import ARCHITECTURES

    offered = typing.get_args(Sae.model_fields["architecture"].annotation)
    assert set(offered) == set(ARCHITECTURES)
