"""Transcoders (`sae.transcode`, `sae.skip_connection`): an SAE that predicts a module's
output from its input. Its loss and gradients equal a dense autograd reference (skip term
included), normalisation folds into it, sparsify and SAELens load it and agree, and a fit
learns a map no autoencoder could."""

from __future__ import annotations

import pytest
import sparsify  # eai-sparsify, a dev dependency: a missing install fails, never skips
import torch

from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SaeConfig, SparseAutoencoder
from sae_ray.sae.trainer import fit_in_process
from sae_ray.sae.training import DeadTracker, sae_loss


def _transcoder(arch: str, skip: bool, d_in: int = 12, d_out: int = 8) -> SparseAutoencoder:
    torch.manual_seed(0)
    cfg = SaeConfig(d_in, 48, 4, arch, transcode=True, d_out=d_out, skip_connection=skip)
    tc = SparseAutoencoder(cfg)
    with torch.no_grad():  # off the zero init, so every term carries a gradient
        tc.W_dec.normal_(0, 0.3)
        tc.b_dec.normal_(0, 0.1)
        tc.encoder.bias.normal_(0, 0.1)
        if skip:
            tc.W_skip.normal_(0, 0.2)
    return tc


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_loss_and_gradients_equal_a_dense_autograd_reference(arch, skip):
    tc = _transcoder(arch, skip)
    x, y = torch.randn(64, 12), torch.randn(64, 8) * 2 + 1
    tracker = DeadTracker(torch.zeros(48, dtype=torch.long), 10**9)
    loss, stats = sae_loss(tc, tc, x, tracker, auxk_alpha=0.0, y=y)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in tc.named_parameters()}

    ref = {n: p.detach().clone().requires_grad_(True) for n, p in tc.named_parameters()}
    pre = x @ ref["encoder.weight"].T + ref["encoder.bias"]  # no b_dec subtracted
    if arch == "topk":
        top = pre.topk(4, dim=-1)
        z = torch.zeros_like(pre).scatter(1, top.indices, top.values.relu())
    else:  # the batch's 4 x 64 largest
        keep = pre.relu().flatten().topk(4 * 64).indices
        z = torch.zeros_like(pre).flatten().index_put((keep,), pre.flatten()[keep]).view_as(pre)
        z = z.relu()
    y_hat = z @ ref["W_dec"] + ref["b_dec"]
    if skip:
        y_hat = y_hat + x @ ref["W_skip"].T
    expected = (y - y_hat).pow(2).sum() / (y - y.mean(0)).pow(2).sum()
    expected.backward()

    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert stats["fvu"] == pytest.approx(float(expected.detach()), rel=1e-5)
    assert set(ours) == set(ref) and ("W_skip" in ours) == skip
    for name, grad in ours.items():
        torch.testing.assert_close(grad, ref[name].grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_folding_input_and_output_scales_keeps_the_prediction(arch):
    tc = _transcoder(arch, skip=True)
    x, y = torch.randn(128, 12) * 30 + 4, torch.randn(128, 8) * 5
    s_in, s_out = 0.05, 0.7
    tc.init_b_dec(x * s_in, y * s_out)
    if arch == "batchtopk":
        tc.threshold.fill_(0.2)
    tc.eval()
    folded = SparseAutoencoder(tc.cfg)
    folded.load_state_dict(tc.state_dict())
    folded.fold_input_scale(s_in, s_out).eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x)[0], tc(x * s_in)[0] / s_out, rtol=1e-4, atol=1e-5)


def test_sparsify_loads_a_topk_skip_transcoder_and_agrees(tmp_path):
    tc = _transcoder("topk", skip=True, d_in=12, d_out=12)  # sparsify's: one width
    tc.save(tmp_path / "h.0.mlp")
    theirs = sparsify.SparseCoder.load_from_disk(tmp_path / "h.0.mlp")
    assert theirs.cfg.transcode and theirs.cfg.skip_connection
    x, y = torch.randn(32, 12), torch.randn(32, 12)
    with torch.no_grad():
        out = theirs(x, y)
        torch.testing.assert_close(tc(x)[0], out.sae_out.to(torch.float32), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ["batchtopk", "jumprelu"])
def test_saelens_loads_the_exported_transcoder_and_agrees(tmp_path, arch, skip):
    from sae_lens import SAE

    from sae_ray.sae.export import export_saelens

    tc = _transcoder(arch, skip)
    x = torch.randn(64, 12)
    tc.init_b_dec(x, torch.randn(64, 8))
    if arch == "batchtopk":
        tc.threshold.fill_(0.1)
    tc.eval()
    theirs = SAE.load_from_disk(str(export_saelens(tc, tmp_path / "tc")))
    kind = "jumprelu_skip_transcoder" if skip else "jumprelu_transcoder"
    assert theirs.cfg.architecture() == kind and theirs.cfg.d_out == 8
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), tc(x)[0], rtol=1e-4, atol=1e-5)


def test_a_topk_transcoder_export_is_refused_before_anything_is_written(tmp_path):
    from sae_ray.cli.main import main

    _transcoder("topk", skip=False).save(tmp_path / "run" / "h.0.mlp")
    assert main(["export-saelens", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_skip_transcoder_fit_learns_a_map_from_input_to_output(tmp_path):
    """y = A x + sparse part: the skip term takes the linear map, the latents the rest."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 16, generator=gen)
    a = torch.randn(16, 12, generator=gen) / 4
    pre = x @ torch.randn(16, 64, generator=gen) / 4  # what the latents can read from x
    y = x @ a + (pre * (pre > 2)) @ torch.randn(64, 12, generator=gen) / 2
    common = dict(
        hookpoints=["h.0.mlp"], d_in=16, widths={"h.0.mlp": 12}, k=8, expansion_factor=8,
        batch_size=256, epochs=16, lr=1e-2, transcode=True, progress=False,
    )  # fmt: skip
    columns = {"h.0.mlp:input": x, "h.0.mlp": y}
    result = {
        skip: fit_in_process(columns, SaeTrainConfig(**common, skip_connection=skip))
        for skip in (False, True)
    }
    for fit in result.values():
        tc = fit.saes["h.0.mlp"]
        assert tc.cfg.transcode and tc.cfg.d_in == 16 and tc.cfg.width_out == 12
        with torch.no_grad():
            fvu = float((y - tc(x)[0]).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
        assert fvu == pytest.approx(fit.metrics["fvu/h.0.mlp"], abs=0.1)
    fvu = {skip: fit.metrics["fvu/h.0.mlp"] for skip, fit in result.items()}
    assert fvu[True] < 0.2 and fvu[True] < fvu[False] - 0.02, fvu


def test_a_transcoder_reads_a_module_not_its_input():
    with pytest.raises(ValueError, match=r"name the module \(h.0.mlp\)"):
        SaeTrainConfig(hookpoints=["h.0.mlp:input"], d_in=8, transcode=True)
    with pytest.raises(ValueError, match="skip_connection: only a transcoder"):
        SaeTrainConfig(hookpoints=["h.0"], d_in=8, skip_connection=True)
    with pytest.raises(ValueError, match="transcode: an end-to-end fit"):
        SaeTrainConfig(hookpoints=["h.0"], d_in=8, transcode=True, loss_fn="ce")


def test_a_normalised_transcoder_takes_raw_input_and_predicts_raw_output(tmp_path):
    """Input and output each scaled to E‖·‖ = √d in training; the saved transcoder has both
    scales folded in."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 16, generator=gen) * 300 + 20
    y = (x / 300) @ torch.randn(16, 8, generator=gen) * 0.01
    cfg = SaeTrainConfig(
        hookpoints=["m"], d_in=16, widths={"m": 8}, k=4, expansion_factor=4, batch_size=256,
        epochs=6, lr=1e-2, transcode=True, skip_connection=True, normalize_activations=True,
        progress=False,
    )  # fmt: skip
    result = fit_in_process({"m:input": x, "m": y}, cfg, tmp_path / "run")
    saved = SparseAutoencoder.load(tmp_path / "run" / "m")
    with torch.no_grad():
        fvu = float((y - saved(x)[0]).pow(2).sum() / (y - y.mean(0)).pow(2).sum())
    assert fvu < 0.1 and fvu == pytest.approx(result.metrics["fvu/m"], abs=0.05)
    assert '"scales": {"m:input": ' in (tmp_path / "run" / "state.json").read_text()


def test_train_on_activations_pairs_each_module_with_its_input(tmp_path):
    """The Python API (and `train-sae --activations --transcode`): a Parquet file of `m:input`
    and `m` columns trains the transcoder m; a file without inputs is refused, naming it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sae_ray.config import ConfigError
    from sae_ray.sae.cached import train_on_activations

    def vectors_to_arrow(a):  # a user's file: float vectors as fixed-size lists
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2048, 16, generator=gen)
    y = x @ torch.randn(16, 8, generator=gen)
    table = {"m:input": vectors_to_arrow(x.numpy()), "m": vectors_to_arrow(y.numpy())}
    pq.write_table(pa.table(table), tmp_path / "acts.parquet")
    sae = {"k": 4, "expansion_factor": 4, "epochs": 8, "batch_size": 128, "lr": 1e-2}
    sae.update(transcode=True, skip_connection=True)
    result = train_on_activations(
        tmp_path / "acts.parquet", sae, tmp_path / "out", use_ray=False, progress=False
    )
    tc = result.saes["m"]
    assert list(result.saes) == ["m"] and tc.cfg.d_in == 16 and tc.cfg.width_out == 8
    assert result.metrics["fvu/m"] < 0.5
    pq.write_table(pa.table({"m": table["m"]}), tmp_path / "outputs.parquet")
    with pytest.raises(ConfigError, match=r"transcode: .*outputs.parquet has no NAME:input"):
        train_on_activations(tmp_path / "outputs.parquet", sae, tmp_path / "out", use_ray=False)
