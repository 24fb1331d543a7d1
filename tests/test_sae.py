import pytest
import torch

from sae_ray.sae.model import SaeConfig, SparseAutoencoder, auxk_loss, fvu


def _sae(d=16, n=64, k=4):
    torch.manual_seed(0)
    return SparseAutoencoder(SaeConfig(d, n, k))


def test_init_ties_decoder_to_encoder_with_unit_rows():
    sae = _sae()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    cos = torch.nn.functional.cosine_similarity(sae.W_dec, sae.encoder.weight, dim=1)
    torch.testing.assert_close(cos, torch.ones(64))


def test_codes_are_topk_of_centred_preactivations():
    sae = _sae()
    x = torch.randn(32, 16)
    sae.init_b_dec(x)
    codes = sae.encode(x)
    pre = torch.relu(sae.encoder(x - sae.b_dec))
    assert codes.values.shape == (32, 4)
    torch.testing.assert_close(codes.values.sort(-1).values, pre.topk(4).values.sort(-1).values)
    dense = sae.dense_codes(x)
    assert ((dense > 0).sum(-1) <= 4).all()


def test_sparse_decode_equals_dense_decode():
    sae = _sae()
    x = torch.randn(32, 16)
    x_hat, _ = sae(x)
    torch.testing.assert_close(x_hat, sae.decode_dense(sae.dense_codes(x)), rtol=1e-5, atol=1e-5)


def test_parallel_gradient_removed_and_rows_renormalised():
    sae = _sae()
    x = torch.randn(64, 16)
    x_hat, _ = sae(x)
    fvu(x, x_hat).backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    along = (sae.W_dec.grad * sae.W_dec).sum(-1)
    assert along.abs().max() < 1e-6
    # a large SGD step takes the rows off the unit sphere; renormalising puts them back
    with torch.no_grad():
        sae.W_dec -= 10.0 * sae.W_dec.grad + 0.5 * sae.W_dec
    assert (sae.W_dec.norm(dim=-1) - 1).abs().max() > 0.1
    direction = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=-1, keepdim=True)
    sae.set_decoder_norm_to_unit_norm()
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(len(sae.W_dec)))
    torch.testing.assert_close(sae.W_dec.detach(), direction)  # same directions, unit length


def test_auxk_uses_only_dead_latents():
    sae = _sae()
    x = torch.randn(32, 16)
    none = torch.zeros(64, dtype=torch.bool)
    x_hat, codes = sae(x, none)
    assert auxk_loss(sae, x, x_hat, codes, 0).item() == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    x_hat, codes = sae(x, dead)
    assert set(codes.aux_indices.unique().tolist()) <= set(range(10))
    loss = auxk_loss(sae, x, x_hat, codes, 10)
    loss.backward()
    assert sae.W_dec.grad[10:].abs().sum() == 0 and sae.W_dec.grad[:10].abs().sum() > 0


def test_fvu_known_values():
    x = torch.randn(100, 8)
    assert fvu(x, x).item() == 0
    assert abs(fvu(x, x.mean(0).expand_as(x)).item() - 1) < 1e-6


def test_save_load_round_trip(tmp_path):
    sae = _sae()
    sae.save(tmp_path / "layer")
    assert (tmp_path / "layer" / "sae.safetensors").is_file()
    back = SparseAutoencoder.load(tmp_path / "layer")
    x = torch.randn(5, 16)
    torch.testing.assert_close(back(x)[0], sae(x)[0])


def test_sparse_encoder_backward_equals_dense_autograd():
    """The k-sparse backward gives the gradients of the plain dense formulation, AuxK too."""
    import torch.nn.functional as F

    sae = _sae(d=16, n=64, k=4)
    x = torch.randn(48, 16) * 2 + 0.5
    sae.init_b_dec(x)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[::3] = True
    x_hat, codes = sae(x, dead)
    loss = fvu(x, x_hat) + 0.5 * auxk_loss(sae, x, x_hat, codes, int(dead.sum()))
    loss.backward()
    sparse = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()

    pre = F.relu(F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias))
    values, indices = pre.topk(4, dim=-1)
    x_hat = F.embedding_bag(indices, sae.W_dec, per_sample_weights=values, mode="sum")
    x_hat = x_hat + sae.b_dec
    k_aux = min(8, int(dead.sum()))
    aux_v, aux_i = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=-1)
    e_hat = F.embedding_bag(aux_i, sae.W_dec, per_sample_weights=aux_v, mode="sum")
    total = (x - x.mean(0)).pow(2).sum()
    aux = min(int(dead.sum()) / 8, 1.0) * ((x - x_hat).detach() - e_hat).pow(2).sum() / total
    (fvu(x, x_hat) + 0.5 * aux).backward()
    for name, param in sae.named_parameters():
        assert sparse[name].abs().sum() > 0, name
        torch.testing.assert_close(sparse[name], param.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_encoder_under_bf16_autocast_keeps_fp32_gradients():
    """The trainer autocasts the encoder to bf16 on GPUs; CPU autocast runs the same path."""
    sae = _sae(d=16, n=64, k=4)
    x = torch.randn(32, 16)
    with torch.autocast("cpu", torch.bfloat16):
        x_hat, codes = sae(x)
        loss = fvu(x, x_hat)
    assert codes.values.dtype == torch.bfloat16
    loss.backward()
    assert sae.encoder.weight.grad.dtype == torch.float32
    assert sae.encoder.weight.grad.abs().sum() > 0
    ref, _ = sae(x)
    assert fvu(x, x_hat.float()).item() == pytest.approx(fvu(x, ref).item(), rel=0.05)
