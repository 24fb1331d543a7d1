"""The ground-truth sweep (`dataset.name: synthetic:synthsae`) without Ray: its config,
its preflight, and one trial in one process, scored by SAELens's evaluation against the
world's known features (an oracle decoder scores MCC 1)."""

from __future__ import annotations

import builtins

import pytest
import torch

from sae_ray.cli import preflight
from sae_ray.config import Config, ConfigError
from sae_ray.storage.artifacts import ArtifactStore
from sae_ray.trial import ground_truth
from sae_ray.trial.stages import Trial


def _cfg(tmp_path, **synthetic) -> Config:
    return Config.model_validate(
        {
            "experiment": {"name": "gt", "storage_path": str(tmp_path)},
            "dataset": {"name": "synthetic:synthsae"},
            "synthetic": {
                "num_features": 64,
                "hidden_dim": 16,
                "root_nodes": 2,
                "train_samples": 4000,
                "eval_samples": 2000,
                **synthetic,
            },
            "cycles": {"count": 1},
            "sae": {"k": 4, "num_latents": 32, "epochs": 2, "batch_size": 256, "lr": 3e-3},
            "search": {"control": False},
            "resources": {"num_workers": 1},
        }
    )


def _trial(cfg: Config) -> Trial:
    root, runs = cfg.trial_dirs("t")
    return Trial(cfg, None, ArtifactStore(root), runs, cfg.strategy)


def test_a_ground_truth_sweep_fits_once_per_trial(tmp_path):
    cfg = _cfg(tmp_path)
    assert cfg.ground_truth
    with pytest.raises(ValueError, match="cycles.count"):
        Config.model_validate({**cfg.model_dump(), "cycles": {"count": 2}})


def test_preflight_names_the_missing_extra(tmp_path, monkeypatch):
    real = builtins.__import__

    def no_sae_lens(name, *args, **kwargs):
        if name.startswith("sae_lens"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sae_lens)
    with pytest.raises(ConfigError, match=r"dataset.name: .*sae-ray\[synthsae\]"):
        preflight.check(_cfg(tmp_path))


def test_preflight_checks_k_against_the_world(tmp_path):
    cfg = _cfg(tmp_path)
    cfg = cfg.model_copy(update={"sae": cfg.sae.model_copy(update={"k": 40})})
    with pytest.raises(ConfigError, match=r"sae.k: .*synthetic.hidden_dim"):
        preflight.check(cfg)


def test_one_trial_in_one_process_is_scored_against_the_true_features(tmp_path):
    """Fitted and scored: MCC, F1 and L0 in range, the SAE's L0 its k (TopK), the world's
    true L0 recorded; and the same scoring of an oracle, whose decoder is the true
    features, reads MCC 1."""
    from sae_lens.synthetic import SyntheticModel, mean_correlation_coefficient

    from sae_ray.sae.model import SaeConfig, SparseAutoencoder

    cfg = _cfg(tmp_path)
    trial = _trial(cfg)
    reported = []
    ground_truth.run_ground_truth(trial, lambda cycle, m: reported.append((cycle, m)))
    ((cycle, metrics),) = reported
    assert cycle == 0 and metrics["n_seeds"] == 1
    assert 0 < metrics["gt/mcc"] < 1 and 0 <= metrics["gt/f1"] <= 1
    assert metrics["gt/l0"] == pytest.approx(4.0, abs=0.05)  # TopK: k per draw
    assert 1 < metrics["gt/true_l0"] < 64
    world = ground_truth.world_activations(trial)
    model = SyntheticModel.load_from_disk(world.local(ground_truth.WORLD))
    features = model.feature_dict.feature_vectors.detach()
    sae = SparseAutoencoder(SaeConfig(16, 64, 4))
    with torch.no_grad():
        sae.W_dec.copy_(features)
    sae.save(tmp_path / "oracle")
    oracle = ground_truth.scored(trial, world, type(world)(str(tmp_path / "oracle"), "o"))
    assert oracle["gt/mcc"] == pytest.approx(1.0, abs=1e-5)
    fitted = mean_correlation_coefficient(sae.W_dec.detach(), features)
    assert fitted == pytest.approx(1.0, abs=1e-5)  # SAELens's own MCC agrees


def test_plan_says_what_the_world_and_the_sae_take(tmp_path, capsys):
    from sae_ray.cli.commands import plan

    assert plan(_cfg(tmp_path)) == 0
    said = capsys.readouterr().out
    assert "no model" in said and "4,000 draws x 16 dims" in said and "held in each worker" in said
