import torch

from sae_ray.sae import SaeConfig, SparseAutoencoder, auxk_loss, fvu


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


def test_auxk_uses_only_dead_latents():
    sae = _sae()
    x = torch.randn(32, 16)
    x_hat, codes = sae(x)
    none_dead = auxk_loss(sae, x, x_hat, codes.pre, torch.zeros(64, dtype=torch.bool))
    assert none_dead.item() == 0
    dead = torch.zeros(64, dtype=torch.bool)
    dead[:10] = True
    loss = auxk_loss(sae, x, x_hat, codes.pre, dead)
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
