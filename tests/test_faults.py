"""Numeric and storage faults end in a clear error, never in silently wrong numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from sae_ray.config import Resources
from sae_ray.lm.extraction import extract, read_manifest
from sae_ray.lm.models import build_classifier
from tests.conftest import QUICKSTART, ROOT
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


FAULT_OVERRIDES = [
    "experiment.name=faults",
    "dataset.num_examples=400",
    "cycles.count=2",
    "cycles.epochs=1",
    "sae.epochs=60",  # ~2000 small steps a fit: long enough to be killed in
    "sae.batch_size=128",
    "sae.save_every=100",
    "sharpening.strategy=random",
    "search.num_samples=1",
    "search.control=false",
    "search.space={sae.k: {type: choice, values: [8]}}",
    "search.points_to_evaluate=[]",
    "wandb.mode=disabled",
]


def _train_worker_pids() -> list[int]:
    """Live Ray Train workers, from Ray's state API (what the dashboard's Actors page shows)."""
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    return [a.pid for a in actors if a.pid]


def _cycle1_fit_step(sweep) -> int:
    """The step of the cycle-1 SAE fit's latest checkpoint (0 before it has one): both
    models and both activation sets are published, and an SAE not yet published has kept
    a checkpoint under train_runs/sae-<its key>."""
    done = {p.parent.name for p in sweep.glob("artifacts/*/.complete")}
    if (
        sum(n.startswith("model-") for n in done) < 2
        or sum(n.startswith("activations-") for n in done) < 2
    ):
        return 0
    for state in sweep.glob("train_runs/sae-*/state.json"):
        if state.parent.name in done:
            continue  # the cycle-0 fit's, about to be removed
        try:
            return int(json.loads(state.read_text())["step"])
        except (ValueError, KeyError, OSError):
            continue  # being replaced
    return 0


@pytest.mark.ray
def test_a_train_worker_killed_mid_trial_resumes_where_it_was(ray_cluster, tmp_path):
    """SIGKILL one rank of the trial's worker group during cycle 1's SAE fit: the group is
    restarted, every finished stage is found in the store (not recomputed), cycle 0 is not
    reported twice, the fit continues from its checkpoint (not from step 0), trains each
    epoch once, and the sweep ends complete."""
    address = ray_cluster.get_runtime_context().gcs_address
    args = [str(QUICKSTART), *FAULT_OVERRIDES, f"experiment.storage_path={tmp_path}"]
    driver = subprocess.Popen(
        [sys.executable, "-m", "sae_ray", "sweep", *args, "--address", address],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    sweep = tmp_path / "faults"
    deadline, killed = time.time() + 600, None
    while killed is None:
        assert driver.poll() is None, "the sweep ended before its cycle-1 SAE fit checkpointed"
        assert time.time() < deadline, "no cycle-1 SAE checkpoint in 10 minutes"
        if _cycle1_fit_step(sweep) > 0:
            pids = _train_worker_pids()
            if pids:
                killed, killed_at = pids[-1], time.time()
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.5)
    out, _ = driver.communicate(timeout=900)
    assert driver.returncode == 0, out[-3000:]
    assert killed not in _train_worker_pids()
    results = pd.read_csv(sweep / "results.csv")
    assert list(results["cycle"]) == [0, 1], results  # each cycle reported once
    assert (results["status"] == "COMPLETE").all() and results["interp/u"].notna().all()
    artifacts = sweep / "artifacts"
    # stages finished before the kill were found, not recomputed: one of each, published then
    before = [p for p in artifacts.glob("*/.complete") if p.stat().st_mtime < killed_at]
    kinds = sorted(p.parent.name.split("-")[0] for p in before)
    assert kinds == ["activations", "activations", "model", "model", "sae", "targets"], kinds
    assert len(list(artifacts.glob("*/.complete"))) == 7  # + the cycle-1 SAE, after the kill
    (sae_dir,) = [p.parent for p in artifacts.glob("sae-*/.complete") if p not in before]
    metrics = json.loads((sae_dir / "train_metrics.json").read_text())
    assert metrics["resumed_from_step"] > 0, metrics  # not from scratch
    acts = max(artifacts.glob("activations-*"), key=lambda p: (p / ".complete").stat().st_mtime)
    rows = read_manifest(acts / "train" / "tokens").rows
    # every epoch trained once (equal splits drop under one row per worker per epoch)
    assert 60 * (rows - 1) <= metrics["tokens"] <= 60 * rows
    assert not list((sweep / "train_runs").iterdir())  # checkpoints and run folders removed
