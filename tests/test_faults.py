"""Numeric and storage faults end in a clear error, never in silently wrong numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae_ray.config import Resources
from sae_ray.lm.extraction import extract, read_manifest
from sae_ray.lm.models import build_classifier
from tests.test_ray_e2e import _write_tokens


def test_non_finite_activations_stop_the_extraction(tmp_path, topics):
    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, seed=0, max_length=32)
    with torch.no_grad():
        clf.model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"h\.1: activations are NaN or Inf"):
        extract(clf, topics.splits["train"], -1, tmp_path / "acts", 32)


@pytest.mark.ray
def test_an_sae_fed_nan_fails_with_the_reason(ray_cluster, tmp_path):
    from sae_ray.sae.feeds import activation_dataset
    from sae_ray.sae.fit_config import SaeTrainConfig
    from sae_ray.sae.trainer import train_saes

    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    x[1500] = np.nan  # a poisoned row late in the epoch: caught when it arrives
    _write_tokens(tmp_path / "tokens", x, shard_rows=1000)
    cfg = SaeTrainConfig(
        hookpoints=["x"], d_in=16, k=4, expansion_factor=2, batch_size=250, progress=False
    )
    data = activation_dataset(tmp_path / "tokens", ["x"])
    with pytest.raises(Exception, match="SAE loss is nan at step") as err:
        train_saes(*data, cfg, Resources(num_workers=1, max_failures=0), tmp_path / "train")
    from sae_ray.sweep.results import _error_line

    assert "SAE loss is nan" in _error_line(err.value)  # what results.csv would say


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_artifact_is_computed_again(tmp_path, damage, monkeypatch):
    from sae_ray.storage import artifacts as store_mod
    from sae_ray.storage.artifacts import ArtifactStore

    calls = []

    def compute(out):
        calls.append(1)
        (out / "sae.safetensors").write_bytes(bytes(range(256)) * 64)

    art = ArtifactStore(tmp_path).get_or_compute("sae", {"k": 4}, compute)
    weights = art.local() / "sae.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10] if damage == "truncate" else data[:100] + b"\xff" + data[101:])
    monkeypatch.setattr(store_mod, "_VERIFIED", set())  # as a new trial process would start
    again = ArtifactStore(tmp_path).get_or_compute("sae", {"k": 4}, compute)
    assert len(calls) == 2 and (again.local() / "sae.safetensors").read_bytes() == data
    ArtifactStore(tmp_path).get_or_compute("sae", {"k": 4}, compute)
    assert len(calls) == 2  # whole again: reused


def test_a_damaged_shard_is_refused_by_the_manifest(tmp_path):
    x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    _write_tokens(tmp_path / "tokens", x, shard_rows=100)
    shard = sorted((tmp_path / "tokens").glob("*.parquet"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{shard.name}: checksum does not match"):
        read_manifest(tmp_path / "tokens", verify=True)
