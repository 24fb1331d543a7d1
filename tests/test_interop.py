"""Our checkpoints are sparsify checkpoints: the real eai-sparsify loads them and agrees;
and exported, SAELens loads every architecture and agrees."""

import pytest
import sparsify  # eai-sparsify, a dev dependency: a missing install fails, never skips
import torch

from sae_ray.sae.model import SaeConfig, SparseAutoencoder


def test_sparsify_loads_our_checkpoint_and_gives_the_same_codes(tmp_path):
    torch.manual_seed(0)
    ours = SparseAutoencoder(SaeConfig(d_in=48, num_latents=192, k=12))
    x = torch.randn(256, 48)
    ours.init_b_dec(x)
    with torch.no_grad():  # move off the tied init so the test can tell W_dec from W_encᵀ
        ours.W_dec.add_(0.1 * torch.randn_like(ours.W_dec))
        ours.encoder.bias.normal_(0, 0.05)
    ours.set_decoder_norm_to_unit_norm()
    path = tmp_path / "run" / "layers.1"
    ours.save(path)

    theirs = sparsify.SparseCoder.load_from_disk(path)
    assert theirs.num_latents == 192 and theirs.cfg.k == 12
    enc = theirs.encode(x)
    codes = ours.encode(x)
    mine = torch.zeros(256, 192).scatter_(1, codes.indices, codes.values)
    other = torch.zeros(256, 192).scatter_(1, enc.top_indices, enc.top_acts)
    torch.testing.assert_close(mine, other.to(mine.dtype), rtol=1e-5, atol=1e-6)
    out = theirs(x)
    x_hat, _ = ours(x)
    torch.testing.assert_close(x_hat, out.sae_out.to(x_hat.dtype), rtol=1e-4, atol=1e-5)


def test_auxk_loss_matches_sparsify_with_few_dead_latents(tmp_path):
    from sae_ray.sae.model import auxk_loss

    torch.manual_seed(1)
    ours = SparseAutoencoder(SaeConfig(d_in=32, num_latents=128, k=8))
    x = torch.randn(200, 32)
    ours.init_b_dec(x)
    ours.save(tmp_path / "sae")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "sae")
    for num_dead in (3, 40):  # fewer than d/2 = 16 (loss scaled down), and more
        dead = torch.zeros(128, dtype=torch.bool)
        dead[torch.randperm(128)[:num_dead]] = True
        x_hat, codes = ours(x, dead)
        mine = auxk_loss(ours, x, x_hat, codes, num_dead)
        want = theirs(x, dead_mask=dead).auxk_loss
        torch.testing.assert_close(mine, want.to(mine.dtype), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_saelens_loads_each_architecture_and_reproduces_its_codes(tmp_path, capsys, arch):
    """`sae-ray export-saelens` (`export_run`) writes SAELens' own layout;
    `SAE.load_from_disk` gives back a TopK or JumpReLU SAE (BatchTopK and Matryoshka as
    SAELens saves its own) with our codes and reconstructions."""
    from sae_lens import SAE

    from sae_ray.cli.main import main

    torch.manual_seed(0)
    x = torch.randn(64, 16) * 3 + 1
    ours = SparseAutoencoder(SaeConfig(16, 64, 4, architecture=arch))
    ours.init_b_dec(x)
    if arch in ("batchtopk", "matryoshka"):
        ours.threshold.fill_(0.8)
    if arch == "jumprelu":
        ours.log_threshold.data.uniform_(-2, 0.5)
    ours.save(tmp_path / "run" / "k4" / "h.3")
    assert main(["export-saelens", str(tmp_path / "run"), str(tmp_path / "saelens")]) == 0
    folder = tmp_path / "saelens" / "k4" / "h.3"
    assert capsys.readouterr().out.splitlines() == [f"SAELens folder: {folder}"]
    theirs = SAE.load_from_disk(str(folder))
    assert type(theirs).__name__ == ("TopKSAE" if arch == "topk" else "JumpReLUSAE")
    ours = SparseAutoencoder.load(tmp_path / "run" / "k4" / "h.3")
    with torch.no_grad():
        codes = ours.dense_codes(x)
        torch.testing.assert_close(theirs.encode(x), codes)
        torch.testing.assert_close(theirs.decode(codes), ours(x)[0])
    assert 0 < (codes > 0).sum(-1).float().mean() < 64


def test_the_export_writes_a_model_card_and_pushes_it_to_the_hub(tmp_path, capsys, monkeypatch):
    """Each SAELens folder gets a README.md model card (the SAELens library tag, settings,
    training and metrics); `--push` uploads OUT to the repository (the hub call recorded:
    there is no hub here)."""
    import json

    from huggingface_hub import HfApi

    from sae_ray.cli.main import main

    sae = SparseAutoencoder(SaeConfig(16, 64, 4, architecture="jumprelu", target_l0=3.0))
    sae.save(tmp_path / "run" / "h.2")
    (tmp_path / "run" / "state.json").write_text(json.dumps({"step": 120, "tokens": 491520}))
    row = {"step": 120, "fvu/h.2": 0.125, "l0/h.2": 3.1, "dead_pct/h.2": 2.0}
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    calls = []
    monkeypatch.setenv("HF_TOKEN", "hf_planted")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, *a, **k: calls.append(("create", a)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **k: calls.append(("upload", k)))
    out = tmp_path / "saelens"
    assert main(["export-saelens", str(tmp_path / "run"), str(out), "--push", "me/my-saes"]) == 0
    card = (out / "h.2" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\ntags: [sae_lens,")
    for text in ("# jumprelu SAE: h.2", "| target_l0 | 3 |", "| tokens | 491520 |"):
        assert text in card, text
    assert "| fvu/h.2 | 0.125 |" in card
    assert calls[0] == ("create", ("me/my-saes",))
    assert calls[1][0] == "upload" and calls[1][1]["folder_path"] == str(out)
    assert capsys.readouterr().out.splitlines()[-1] == "pushed: https://huggingface.co/me/my-saes"


@pytest.mark.parametrize(
    "repo, token, message",
    [
        ("not a repo", "hf_x", "--push: 'not a repo' is not a hub repository id"),
        ("just-a-name", "hf_x", "--push: 'just-a-name': name it OWNER/NAME"),
        ("me/my-saes", None, "--push: no Hugging Face token"),
    ],
)
def test_a_push_that_cannot_succeed_is_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch, repo, token, message
):
    from sae_ray.cli.main import main

    SparseAutoencoder(SaeConfig(8, 16, 2)).save(tmp_path / "run" / "h.0")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    assert main(["export-saelens", str(tmp_path / "run"), str(tmp_path / "x"), "--push", repo]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not (tmp_path / "x").exists()
