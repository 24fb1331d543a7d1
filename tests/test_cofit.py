"""Across a sweep's trials, SAE fits on the same activations train together: which planned
points are a fit's peers (Ray-free), and on the test cluster, a trial's fit publishing its
peers' SAEs, each bit for bit the SAE its own trial fits alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_ray import config as C
from sae_ray.lm.extraction import read_manifest
from sae_ray.sweep.space import drawn_ahead, planned_points
from sae_ray.sweep.tuner import with_control
from sae_ray.trial.cofit import peer_saes
from sae_ray.trial.record import running, running_points
from tests.conftest import QUICKSTART

GRID = [
    "search.algorithm=grid",
    "search.points_to_evaluate=[]",
    "search.space={sae.k: {type: choice, values: [4, 8]}, "
    "sharpening.strategy: {type: choice, values: [per_class, random]}}",
]


def _sweep(*overrides: str) -> C.Config:
    return with_control(C.load(QUICKSTART, [*GRID, *overrides]))


def _ks(peers) -> list[int]:
    return sorted(p.k for p in peers)


def test_a_grid_plans_every_combination_the_control_included():
    plan = planned_points(_sweep())
    assert len(plan) == 2 * 3  # k x (per_class, random, none)
    assert {"sae.k": 4, "sharpening.strategy": "none"} in plan
    assert planned_points(_sweep("experiment.share_artifacts=false")) == []


def test_points_to_evaluate_are_planned_when_they_set_what_they_sample():
    cfg = with_control(C.load(QUICKSTART))  # the quickstart's four points, control first
    plan = planned_points(cfg)
    assert len(plan) == 4 and plan[1]["sharpening.strategy"] == "none"
    partial = C.load(QUICKSTART, ["search.points_to_evaluate=[{sae.k: 4}]"])
    assert planned_points(partial) == []  # its expansion and strategy are sampled
    fewer = C.load(QUICKSTART, ["search.num_samples=2"])
    assert planned_points(fewer) == cfg.search.points_to_evaluate[:2]  # only those that run


def test_a_random_search_draws_its_points_ahead_and_plans_them_all():
    """Random search does not adapt: its points are drawn up front (seeded), run as
    points_to_evaluate after the control, and every trial knows them."""
    space = (
        "search.space={sae.k: {type: choice, values: [4, 8, 16]}, "
        "sae.expansion_factor: {type: intlog, low: 2, high: 8}, "
        "sharpening.strategy: {type: choice, values: [per_class, random]}, "
        "sharpening.keep_frac: {type: uniform, low: 0.2, high: 0.8, "
        "when: {sharpening.strategy: per_class}}}"
    )
    overrides = ["search.algorithm=random", "search.num_samples=6", "search.points_to_evaluate=[]"]
    cfg = drawn_ahead(with_control(C.load(QUICKSTART, [*overrides, space])))
    points = cfg.search.points_to_evaluate
    assert len(points) == 7 and points[0]["sharpening.strategy"] == "none"  # the control
    for point in points[1:]:
        assert set(point) >= {"sae.k", "sae.expansion_factor", "sharpening.strategy"}
        assert ("sharpening.keep_frac" in point) == (point["sharpening.strategy"] == "per_class")
        assert all(cfg.search.space[k].contains(v) for k, v in point.items())
    assert len({tuple(sorted(p.items())) for p in points}) > 3  # drawn, not one point
    again = drawn_ahead(with_control(C.load(QUICKSTART, [*overrides, space])))
    assert again.search.points_to_evaluate == points  # seeded by experiment.seed
    assert planned_points(cfg) == points
    tpe = with_control(C.load(QUICKSTART, [*overrides[1:], space]))
    assert drawn_ahead(tpe) == tpe  # an adaptive search samples as results come


def test_peers_read_the_same_activations_and_only_those():
    """Cycle 0 and the λ = 0 chain have no SAE upstream: every planned SAE setting reads
    them. Later cycles of an SAE-shaped strategy read activations of their own; an
    SAE-free one's (random) are its same-strategy points'."""
    cfg = _sweep()
    plan = planned_points(cfg)
    mine = C.apply_params(cfg, {"sae.k": 8, "sharpening.strategy": "per_class"})
    assert _ks(peer_saes(mine, plan, "per_class", 0)) == [4]
    assert _ks(peer_saes(mine, plan, C.CONTROL, 1)) == [4]
    assert peer_saes(mine, plan, "per_class", 1) == []
    rand = C.apply_params(cfg, {"sae.k": 8, "sharpening.strategy": "random"})
    assert _ks(peer_saes(rand, plan, "random", 1)) == [4]
    stronger = [{"sae.k": 4, "sharpening.strategy": "random", "cycles.aux_weight": 1.0}]
    assert peer_saes(rand, stronger, "random", 1) == []  # another λ: another cycle-1 model
    assert _ks(peer_saes(rand, stronger, "random", 0)) == [4]  # the same cycle-0 model
    assert _ks(peer_saes(rand, stronger, C.CONTROL, 1)) == [4]  # and λ = 0 chain


def test_sae_only_seeds_are_co_trained_where_no_sae_is_upstream(tmp_path):
    """`search.seeds_vary: sae`: a point's seeds share its model and activations; each of
    its SAEs (and its peers', under every seed) is a peer where no SAE shaped the model;
    each seed's chain is the same experiment with its own SAE seed."""
    from sae_ray.trial.sae_fit import _fitting_peers
    from sae_ray.trial.stages import Trial

    cfg = C.apply_params(
        _sweep("search.seeds=3", "search.seeds_vary=sae"),
        {"sae.k": 8, "sharpening.strategy": "per_class"},
    )
    trial = Trial(cfg, None, None, str(tmp_path), "per_class", plan=planned_points(cfg))
    chains = [trial.seeded(s) for s in trial.seeds()]
    assert {c.seed for c in chains} == {cfg.experiment.seed}  # one experiment
    assert [c.sae_seed for c in chains] == [cfg.experiment.seed + i for i in range(3)]
    second = chains[1]
    peers = _fitting_peers(second, 0, 16)
    assert sorted((p.k, s) for p, s in peers) == sorted(
        [(8, s) for s in trial.seeds() if s != second.sae_seed] + [(4, s) for s in trial.seeds()]
    )
    assert _fitting_peers(second, 1, 16) == []  # cycle 1 reads per_class's own model
    alone = Trial(_sweep(), None, None, str(tmp_path), "per_class")
    assert alone.seeded(5).seed == 5 and alone.seeded(5).sae_seed == 5  # the whole experiment


def test_a_searched_layer_or_expansion_is_a_peer_only_on_its_own_activations():
    cfg = with_control(
        C.load(
            QUICKSTART,
            [
                "search.algorithm=grid",
                "search.points_to_evaluate=[]",
                "search.space={sae.expansion_factor: {type: choice, values: [2, 4]}, "
                "model.layer: {type: choice, values: [0, 1]}}",
            ],
        )
    )
    plan = planned_points(cfg)
    mine = C.apply_params(cfg, {"sae.expansion_factor": 2, "model.layer": 0})
    peers = peer_saes(mine, plan, "per_class", 0)
    assert [p.expansion_factor for p in peers] == [4]  # layer 1's activations are others


def test_a_running_trials_point_is_on_record_until_it_ends(tmp_path):
    runs = str(tmp_path / "train_runs")
    assert running_points(runs) == []
    with running(runs, "a", {"sae.k": 4}), running(runs, "b", {"sae.k": 8}):
        assert sorted(p["sae.k"] for p in running_points(runs)) == [4, 8]
        with pytest.raises(RuntimeError), running(runs, "c", {"sae.k": 2}):
            raise RuntimeError("a failed trial")
        assert len(running_points(runs)) == 2  # c's record went with it
    assert running_points(runs) == []


def test_a_sweep_trial_is_on_record_while_it_runs(tmp_path, monkeypatch):
    """What a Tune trial does around its Train run (`tuner._trainable`): its point is there
    for the fits of the trials beside it, then gone; with `share_artifacts: false` its
    record is in its own folder, which no other trial reads."""
    from types import SimpleNamespace

    from sae_ray.sweep import tuner

    point = {"sae.k": 4, "sharpening.strategy": "random"}
    seen = {}

    def run_trial(cfg, report, trial_id, plan):
        seen["own"] = running_points(cfg.trial_dirs(trial_id)[1])
        seen["shared"] = running_points(cfg.trial_dirs("another")[1])

    context = SimpleNamespace(get_trial_id=lambda: "t1")
    monkeypatch.setattr(tuner.tune, "get_context", lambda: context)
    monkeypatch.setattr(tuner, "run_trial", run_trial)
    for shared in (True, False):
        where = f"experiment.storage_path={tmp_path / str(shared)}"
        cfg = C.load(QUICKSTART, [where, f"experiment.share_artifacts={str(shared).lower()}"])
        tuner._trainable(point, cfg.model_dump(), [])
        assert seen["own"] == [point]
        assert seen["shared"] == ([point] if shared else [])
        assert running_points(cfg.trial_dirs("t1")[1]) == []


# ---------------------------------------------------------------- on the test cluster


def _acts(root, rows: int = 1500, d: int = 16):
    """A trial's activations artifact as the extraction writes its train token rows."""
    from sae_ray.storage.artifacts import Artifact
    from tests.test_ray_e2e import _write_tokens

    x = np.random.default_rng(0).standard_normal((rows, d)).astype(np.float32)
    _write_tokens(root / "train" / "tokens", x, shard_rows=600)
    return Artifact(str(root), "acts")


def _trial(cfg, store_root, plan):
    from sae_ray.storage.artifacts import ArtifactStore
    from sae_ray.trial.stages import Trial

    store = ArtifactStore(store_root / "artifacts")
    return Trial(cfg, None, store, str(store_root / "train_runs"), cfg.strategy, plan)


@pytest.mark.ray
def test_a_fit_publishes_its_peers_each_equal_to_its_own_trials_fit_alone(ray_cluster, tmp_path):
    from sae_ray.trial import sae_fit

    acts = _acts(tmp_path / "acts")
    cfg = C.load(
        QUICKSTART,
        [
            "search.points_to_evaluate=[]",
            "sae.epochs=2",
            "sae.batch_size=256",
            "sae.save_every=3",
            "resources.num_workers=1",
        ],
    )
    points = [
        {"sae.k": 8, "sae.expansion_factor": 4, "sharpening.strategy": "per_class"},
        {"sae.k": 4, "sae.expansion_factor": 2, "sharpening.strategy": "per_example"},
        {"sae.k": 64, "sae.expansion_factor": 2, "sharpening.strategy": "random"},  # k > 32
    ]
    sampled = {"sae.k": 2, "sae.expansion_factor": 2, "sharpening.strategy": "random"}
    first = _trial(C.apply_params(cfg, points[0]), tmp_path / "sweep", points)
    # a trial running beside it (an adaptive search's point, in no plan)
    with running(first.train_runs, "sampled", sampled):
        own = sae_fit.fitted_sae(first, acts, "x", 0)
    # its own, the planned peer that fits the dictionary and the running trial's
    assert first.store.computed == 3
    assert running_points(first.train_runs) == []  # the trial ended
    second_cfg = C.apply_params(cfg, points[1])
    second = _trial(second_cfg, tmp_path / "sweep", points)
    manifest = read_manifest(acts.uri("train", "tokens"))
    peer_spec = sae_fit.sae_spec(second, acts, 0, second_cfg.sae, manifest)
    found = second.store.find("sae", peer_spec)
    assert found is not None and sae_fit.fitted_sae(second, acts, "x", 0) == found
    assert second.store.computed == 0  # found: its trial computes nothing
    alone = _trial(second_cfg, tmp_path / "alone", [])
    solo = sae_fit.fitted_sae(alone, acts, "x", 0)
    ours, theirs = (load_file(f"{a.location}/sae.safetensors") for a in (found, solo))
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    metrics = [
        json.loads((Path(a.location) / "train_metrics.json").read_text()) for a in (found, solo)
    ]
    assert metrics[0]["co_trained"] == 3 and "co_trained" not in metrics[1]
    assert metrics[0]["steps_to_fvu"] == metrics[1]["steps_to_fvu"]
    own_metrics = json.loads((Path(own.location) / "train_metrics.json").read_text())
    assert own_metrics["co_trained"] == 3
    assert not list((tmp_path / "sweep" / "train_runs").glob("sae-*"))  # checkpoints removed
