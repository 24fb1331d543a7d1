"""Many SAEs on one stream: a co-trained SAE is the SAE its solo fit makes (same batches,
same steps, same seed), each with its own folder, optimizer, dead latents and metrics."""

import numpy as np
import pytest
import torch

from sae_ray.cli.main import main
from sae_ray.config import ConfigError
from sae_ray.sae.cached import train_on_activations
from sae_ray.sae.fit_config import SaeTrainConfig, variant_name
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.sae.trainer import fit_in_process


def _columns(n=1536, d=16):
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(64, d, generator=gen)
    codes = torch.rand(n, 64, generator=gen) * (torch.rand(n, 64, generator=gen) < 0.08)
    x = codes @ basis
    return {"a": x, "b": 3 * x.flip(1) + 1}


def _cfg(hookpoints, **kw):
    base = dict(k=4, expansion_factor=4, batch_size=128, epochs=2, dead_tokens=256)
    return SaeTrainConfig(
        **{**base, **kw}, hookpoints=hookpoints, d_in=16, progress=False, shuffle_buffer_tokens=1
    )


VARIANTS = [
    {"k": 2, "expansion_factor": 2},
    {"k": 8, "expansion_factor": 4},
    {"k": 4, "expansion_factor": 8, "lr": 3e-3, "auxk_alpha": 0.5},
    {"architecture": "batchtopk", "k": 3},
    {"architecture": "jumprelu", "k": 3},
]


def test_co_trained_saes_equal_their_solo_fits_bit_for_bit(tmp_path):
    """Five settings x two hookpoints in one pass; each SAE against a fit of it alone.
    AuxK is live (a short dead window), so the dead-latent state is per SAE too."""
    columns = _columns()
    together = fit_in_process(columns, _cfg(["a", "b"], variants=VARIANTS), tmp_path / "all")
    assert len(together.saes) == 10
    for override in VARIANTS:
        solo = fit_in_process({"b": columns["b"]}, _cfg(["b"], **override), tmp_path / "solo")
        key = f"{variant_name(override)}/b"
        co = together.saes[key].state_dict()
        for name, value in solo.saes["b"].state_dict().items():
            assert torch.equal(value, co[name]), (key, name)
        assert solo.metrics["fvu/b"] == together.metrics[f"fvu/{key}"]
        assert solo.metrics["step"] == together.metrics["step"] == 24
        loaded = SparseAutoencoder.load(tmp_path / "all" / key)  # its own folder
        assert loaded.cfg.k == override["k"] and torch.equal(loaded.W_dec, co["W_dec"])
        assert loaded.cfg.architecture == override.get("architecture", "topk")
    wide = variant_name(VARIANTS[2])
    assert wide == "k4-x8-lr0.003-auxk_alpha0.5"
    assert together.metrics[f"auxk/{wide}/a"] > 0  # dead latents were being revived


def test_variants_are_per_sae_settings_only():
    with pytest.raises(ValueError, match="^.*\n.*variants: batch_size is shared by the stream"):
        _cfg(["a"], variants=[{"batch_size": 64}])
    with pytest.raises(ValueError, match="larger than the 32 latents"):
        _cfg(["a"], variants=[{"k": 64, "expansion_factor": 2}])
    with pytest.raises(ValueError, match="variants: an end-to-end fit"):
        _cfg(["a"], variants=[{"k": 2}], loss_fn="ce")
    with pytest.raises(ValueError, match="variants: two entries are the same SAE"):
        _cfg(["a"], variants=[{"k": 2}, {"k": 2}])


def test_train_on_an_array_without_ray(tmp_path):
    x = _columns()["a"].numpy()
    np.save(tmp_path / "x.npy", x)
    sae = {"k": 4, "expansion_factor": 4, "max_tokens": 3072, "batch_size": 256}
    result = train_on_activations(
        tmp_path / "x.npy", sae, tmp_path / "out", use_ray=False, variants=[{"k": 2}, {"k": 8}]
    )
    assert sorted(result.saes) == ["k2/x", "k8/x"] and result.metrics["tokens"] == 3072
    assert result.metrics["fvu/k8/x"] < result.metrics["fvu/k2/x"] < 1
    assert (tmp_path / "out" / "x" / "k8" / "x" / "sae.safetensors").is_file()
    with pytest.raises(ConfigError, match="variants: k: 99 is larger"):
        train_on_activations(tmp_path / "x.npy", sae, tmp_path / "out", variants=[{"k": 99}])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--k", "8", "999"], "--k: 999 is larger than the 16 latents"),
        (["--k", "8", "0"], "--k: must be at least 1"),
        (["--optimizer", "adam", "rmsprop"], "--optimizer: invalid choice: 'rmsprop'"),
    ],
)
def test_a_bad_co_trained_setting_is_one_line_before_ray(tmp_path, capsys, flags, message):
    np.save(tmp_path / "x.npy", _columns()["a"].numpy())
    args = ["train-sae", "--activations", str(tmp_path / "x.npy"), "--expansion_factor", "1"]
    assert main([*args, "--save_dir", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err
    assert not (tmp_path / "out" / ".ray_train").exists()


def test_one_value_per_flag_is_one_sae_per_layer_without_variant_folders(tmp_path):
    """Several values make variants; a single value (or none) keeps the plain layout."""
    from sae_ray.cli.parser import parser as _parser
    from sae_ray.cli.train_sae import check_flags

    args = _parser().parse_args(["train-sae", "m", "d", "--k", "8"])
    assert check_flags(args)[1] == []
    args = _parser().parse_args(
        ["train-sae", "m", "d", "--k", "8", "4", "--architecture", "jumprelu"]
    )
    sae, variants = check_flags(args)
    assert variants == [{"k": 8}, {"k": 4}] and sae.architecture == "jumprelu"
