"""`sae-ray sweep sweeps/synthsae.yaml` on the test cluster, made small: Tune + Optuna
search SAEs on SAELens's synthetic world for MCC against L0, co-trained where they share
the world's draws; results.csv holds SAELens's scores, best.json the Pareto front, and the
report draws that front (checked in headless Chromium)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.ray

OVERRIDES = [
    "synthetic.num_features=128",
    "synthetic.hidden_dim=32",
    "synthetic.root_nodes=2",
    "synthetic.train_samples=20000",
    "synthetic.eval_samples=5000",
    "sae.epochs=2",
    "search.num_samples=3",
    "search.space={sae.architecture: {type: choice, values: [topk, batchtopk]}, "
    "sae.k: {type: choice, values: [2, 4, 8]}, sae.num_latents: {type: choice, values: [64]}}",
    "search.points_to_evaluate=[{sae.architecture: topk, sae.k: 2, sae.num_latents: 64}, "
    "{sae.architecture: batchtopk, sae.k: 8, sae.num_latents: 64}]",
    "search.seeds=2",
    "search.seeds_vary=sae",  # one world, two SAE inits a point, co-trained on its draws
    "wandb.mode=disabled",
]


def test_synthsae_sweep_finds_features_and_draws_the_mcc_l0_front(ray_cluster, tmp_path):
    import subprocess

    from tests.browser import check_rendered

    address = ray_cluster.get_runtime_context().gcs_address
    done = subprocess.run(
        [sys.executable, "-m", "sae_ray", "sweep", str(ROOT / "sweeps" / "synthsae.yaml")]
        + [f"experiment.storage_path={tmp_path}", *OVERRIDES, "--address", address],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    sweep = tmp_path / "synthsae"
    results = pd.read_csv(sweep / "results.csv")
    assert len(results) == 3 and (results["status"] == "COMPLETE").all()
    assert "none" not in set(results.get("sharpening.strategy", []))  # no control added
    assert results["gt/mcc"].between(0.05, 1).all() and results["gt/f1"].between(0, 1).all()
    topk = results[(results["sae.architecture"] == "topk") & (results["sae.k"] == 2)]
    assert topk["gt/l0"].iloc[0] == pytest.approx(2.0, abs=0.01)  # TopK: exactly k
    world = [p for p in (sweep / "artifacts").glob("activations-*") if p.is_dir()]
    assert len(world) == 1  # one world, every trial's SAE fitted on it
    seeds = pd.read_csv(sweep / "seeds.csv")
    assert (results["n_seeds"] == 2).all() and len(seeds) == 6
    per_trial = {tuple(sorted(g)) for _, g in seeds.groupby("trial_id")["seed"]}
    assert len(per_trial) == 1 and len(per_trial.pop()) == 2  # the same two seeds each
    assert (seeds.groupby("trial_id")["gt/mcc"].nunique() == 2).all()  # the SAE's spread
    fits = [
        json.loads(p.read_text()) for p in (sweep / "artifacts").glob("sae-*/train_metrics.json")
    ]
    points = results[["sae.architecture", "sae.k"]].drop_duplicates()
    assert len(fits) == 2 * len(points)  # an SAE per point and seed
    assert all(f["co_trained"] >= 2 for f in fits)  # each seed's beside another's, one stream
    front = json.loads((sweep / "best.json").read_text())["pareto_front"]
    assert front and all("gt/mcc" in e["objectives"] for e in front)
    index = sweep / "report" / "index.html"
    shown = check_rendered(index, tmp_path / "synthsae.png")
    assert "front.png" in {image["src"] for image in shown.images}
    assert "MCC against L0" in Path(index).read_text()
