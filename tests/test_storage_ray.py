"""The quickstart sweep with `storage_path: s3://...`, submitted as a Ray job against a local
S3 server (moto, loopback): it succeeds, and its results, artifacts and Tune state are all
in the bucket. A Train worker of the per_class trial is SIGKILLed during its own cycle-1 SAE
fit (the `SAE_RAY_KILL_SAE_FIT_AT` fault point): the group restarts, finds every finished
stage in the bucket, resumes the fit from its bucket checkpoint, and reports no cycle
twice."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest

from sae_ray import storage
from sae_ray.lm.extraction import read_manifest
from sae_ray.storage.artifacts import DONE
from sae_ray.trial.sae_fit import KILL_SAE_FIT_AT
from tests.conftest import submit_quickstart

pytestmark = pytest.mark.ray
BUCKET_PATH = "s3://sae-ray-test/team/sweeps"
SAVE_EVERY, KILLED_AT = 5, 10  # a fit of 600 examples takes about 28 steps
SMALLER = ("search.num_samples=2", "dataset.num_examples=600", f"sae.save_every={SAVE_EVERY}")
TRIALS = 2
EPOCHS = 4  # the quickstart's sae.epochs


@pytest.fixture(scope="module")
def s3_sweep(ray_cluster, s3_endpoint, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3-sweep")
    # Credentials and the endpoint reach the job, its trials and their workers as a cluster
    # user's would: through the job's runtime_env (or the nodes' own IAM roles).
    env_vars = {
        **s3_endpoint,
        "SAE_RAY_CACHE": str(tmp / "cache"),
        KILL_SAE_FIT_AT: f"1:{KILLED_AT}:per_class",  # its own fit, not its pair's
    }
    # two of the quickstart's points (per_class and its λ = 0 control), 600 examples: every
    # kind of artifact and every shared stage, in half the quickstart's time
    log = submit_quickstart(ray_cluster, tmp, env_vars, BUCKET_PATH, SMALLER)
    assert f"results: {BUCKET_PATH}/quickstart/results.csv" in log
    return f"{BUCKET_PATH}/quickstart", tmp / "cache"


def test_results_are_complete_in_the_bucket(s3_sweep, s3_server):
    sweep, _ = s3_sweep
    results = pd.read_csv(pa.BufferReader(storage.read_bytes(f"{sweep}/results.csv")))
    assert len(results) == TRIALS * 2 and (results["status"] == "COMPLETE").all()
    assert sorted(results.groupby("trial_id")["cycle"].apply(list).tolist()) == [[0, 1]] * TRIALS
    assert results["interp/u"].notna().all() and results["val/accuracy"].notna().all()
    assert results["delta/interp/u"].notna().all() and (results["n_seeds"] == 1).all()
    seeds = pd.read_csv(pa.BufferReader(storage.read_bytes(f"{sweep}/seeds.csv")))
    assert len(seeds) == len(results) and set(seeds["seed"]) == {0}
    compared = pd.read_csv(pa.BufferReader(storage.read_bytes(f"{sweep}/comparison.csv")))
    assert set(compared["strategy"]) == {"per_class"} and (compared["n"] == 1).all()
    best = json.loads(storage.read_bytes(f"{sweep}/best.json"))
    assert best["best"]["trial_id"] in set(results["trial_id"])
    assert storage.is_file(f"{sweep}/optuna.db")


def test_artifacts_and_tune_state_are_in_the_bucket(s3_sweep, s3_server):
    sweep, cache = s3_sweep
    names = storage.listdir(f"{sweep}/artifacts")
    kinds = {n.split("-")[0] for n in names}
    assert kinds == {"model", "activations", "sae", "targets", "evaluation", "trial"}, names
    for name in names:
        assert storage.is_file(f"{sweep}/artifacts/{name}/{DONE}"), name
    # cycle 0 shared by both trials, then one retrained model per strategy
    assert sum(n.startswith("model-") for n in names) == 1 + TRIALS
    listing = storage.listdir(sweep)
    assert any(n.startswith("experiment_state-") for n in listing)  # what --resume reads
    assert sum(n.startswith("trial_") for n in listing) == TRIALS
    # the trials' Train runs and the SAE fits' checkpoints are removed once published
    assert storage.listdir(f"{sweep}/train_runs") == []
    trial = next(n for n in listing if n.startswith("trial_"))
    assert any(n.startswith("offline-run-") for n in storage.listdir(f"{sweep}/{trial}/wandb"))
    # What trials read locally was fetched into the node's cache, not written beside the job.
    assert list((cache / "remote").glob("*/spec.json"))


def _sae_metrics(sweep: str) -> list[dict]:
    return [
        json.loads(storage.read_bytes(f"{sweep}/artifacts/{name}/train_metrics.json"))
        for name in storage.listdir(f"{sweep}/artifacts")
        if name.startswith("sae-")
    ]


def test_a_train_worker_killed_mid_fit_resumes_where_it_was(s3_sweep, s3_server):
    """per_class's cycle-1 fit lost a rank after its step-10 checkpoint: the restarted
    group found the models and activations, resumed the fit from the checkpoint in the
    bucket (not step 0) and trained each epoch once; cycle 0, already reported, was not
    reported again. Its paired λ = 0 model, SAE and evaluation are the control trial's own
    (the control trial computed nothing of cycle 1: it found all of it)."""
    sweep, _ = s3_sweep
    results = pd.read_csv(pa.BufferReader(storage.read_bytes(f"{sweep}/results.csv")))
    cycle1 = results[results["cycle"] == 1].set_index("sharpening.strategy")
    # its own SAE (resumed) and evaluation, then its pair's model, activations, SAE and
    # evaluation
    assert cycle1.loc["per_class", "artifacts/computed"] == 6, cycle1["artifacts/computed"]
    assert cycle1.loc["none", "artifacts/computed"] == 0  # all built as per_class's pair
    paired, control = cycle1.loc["per_class", "control/interp/u"], cycle1.loc["none", "interp/u"]
    assert paired == pytest.approx(control, rel=1e-6)  # the same model, SAE and evaluation
    fits = _sae_metrics(sweep)
    resumed = sorted(m["resumed_from_step"] for m in fits)
    assert resumed == [0, 0, KILLED_AT], resumed  # cycle 0's, the control's, per_class's
    acts = [n for n in storage.listdir(f"{sweep}/artifacts") if n.startswith("activations-")]
    (rows,) = {read_manifest(f"{sweep}/artifacts/{n}/train/tokens").rows for n in acts}
    for metrics in fits:  # every epoch trained once (equal splits drop < 1 row/worker/epoch)
        assert EPOCHS * (rows - 1) <= metrics["tokens"] <= EPOCHS * rows, (metrics, rows)
