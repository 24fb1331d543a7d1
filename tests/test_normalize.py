"""Activation normalisation (`sae.normalize_activations`): a fit trains on x scaled to
E‖x‖ = √d and saves an SAE that takes raw x, the scale folded into its weights; the folded
SAE on raw x is the trained one on scaled x (codes and reconstruction over the scale), for
every architecture, and SAELens's loader reproduces it."""

from __future__ import annotations

import math

import pytest
import torch

from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.trainer import fit_in_process


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka"])
def test_folding_the_scale_keeps_every_output(arch):
    torch.manual_seed(0)
    x = torch.randn(256, 16) * 40 + 7  # raw activations, far from unit scale
    scale = math.sqrt(16) / float(x.norm(dim=-1).mean())
    trained = SparseAutoencoder(SaeConfig(16, 64, 4, architecture=arch))
    trained.init_b_dec(x * scale)
    if arch in ("batchtopk", "matryoshka"):
        trained.threshold.fill_(0.3)
    if arch == "jumprelu":
        trained.log_threshold.data.uniform_(-3, 0)
    trained.eval()
    folded = SparseAutoencoder(trained.cfg)
    folded.load_state_dict(trained.state_dict())
    folded.fold_input_scale(scale).eval()
    with torch.no_grad():
        x_hat_n, _ = trained(x * scale)
        x_hat, _ = folded(x)
        torch.testing.assert_close(x_hat, x_hat_n / scale, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(
            folded.dense_codes(x), trained.dense_codes(x * scale) / scale, rtol=1e-4, atol=1e-6
        )
    assert torch.allclose(folded.W_dec.norm(dim=-1), torch.ones(64))  # unit rows kept


def test_a_normalised_fit_saves_an_sae_for_raw_activations(tmp_path):
    from sae_lens import SAE

    from sae_ray.sae.export import export_saelens

    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(32, 16, generator=gen)
    x = (torch.rand(4096, 32, generator=gen) * (torch.rand(4096, 32, generator=gen) < 0.1)) @ basis
    x = x * 300 + 50  # a model whose activations are large
    cfg = SaeTrainConfig(
        hookpoints=["h"], d_in=16, k=4, expansion_factor=4, batch_size=256, epochs=3,
        lr=3e-3, normalize_activations=True, progress=False,
    )  # fmt: skip
    sae = fit_in_process({"h": x}, cfg, tmp_path / "run").saes["h"]
    with torch.no_grad():
        x_hat, codes = sae(x)
    fvu = float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.3  # it reconstructs raw activations
    saved = SparseAutoencoder.load(tmp_path / "run" / "h")  # the published one: folded too
    torch.testing.assert_close(saved.b_dec, sae.b_dec)
    state = (tmp_path / "run" / "state.json").read_text()
    assert '"scales": {"h": ' in state  # kept for a resume
    theirs = SAE.load_from_disk(str(export_saelens(saved, tmp_path / "saelens")))
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(theirs.encode(x)), x_hat, rtol=1e-4, atol=1e-3)


def test_end_to_end_fits_refuse_it():
    with pytest.raises(ValueError, match="normalize_activations: an end-to-end fit"):
        SaeTrainConfig(hookpoints=["h"], d_in=8, loss_fn="ce", normalize_activations=True)


def test_a_normalised_fit_stopped_and_resumed_ends_where_an_uninterrupted_one_does(tmp_path):
    """Mid-fit checkpoints keep training's weights and the scale; the resumed fit reuses
    that scale (no new estimate) and ends with the uninterrupted fit's folded SAE."""
    from sae_ray.sae.feeds import ArrayFeed
    from sae_ray.sae.trainer import _report_to_disk, fit_saes

    x = torch.randn(2048, 8, generator=torch.Generator().manual_seed(0)) * 30 + 5
    base = dict(
        hookpoints=["h"], d_in=8, k=2, expansion_factor=2, batch_size=128, epochs=2,
        lr=3e-3, normalize_activations=True, progress=False, save_every=5,
    )  # fmt: skip

    def run(cfg: SaeTrainConfig, save_dir, checkpoint=None):
        config = {
            "cfg": cfg.model_dump(),
            "rows": len(x),
            "save_dir": str(save_dir),
            "feed": lambda c, world, device: ArrayFeed(c, world, device, {"h": x}),
        }
        return fit_saes(config, None, checkpoint, _report_to_disk)

    whole = run(SaeTrainConfig(**base), tmp_path / "whole")
    stopped = run(SaeTrainConfig(**base, max_steps=15), tmp_path / "part")
    assert not stopped.finished and stopped.progress.step == 15
    resumed = run(SaeTrainConfig(**base), tmp_path / "again", checkpoint=tmp_path / "part")
    assert resumed.progress.scales == whole.progress.scales == stopped.progress.scales
    ours, theirs = resumed.published()["h"].state_dict(), whole.published()["h"].state_dict()
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)
