"""The search (Ray-free): conditional and log-int spaces, grid, constraints handed to Optuna,
objectives at the last or best cycle, the Pareto front, best.json and the exported study."""

import json
import math

import optuna
import pytest

from sae_ray import config as C
from sae_ray.sweep.results import best_summary, pareto_front, write_outputs
from sae_ray.sweep.space import make_sampler, search_space, suggest
from sae_ray.sweep.tuner import (
    VIOLATION,
    make_searcher,
    num_trials,
    objective_reporter,
    violation,
)
from tests.conftest import QUICKSTART

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = (
    "search.space={"
    "sharpening.strategy: {type: choice, values: [per_class, none]}, "
    "sharpening.keep_frac: {type: uniform, low: 0.1, high: 0.9, "
    "when: {sharpening.strategy: [per_class]}}, "
    "sae.expansion_factor: {type: intlog, low: 2, high: 64}}"
)


def _cfg(*overrides):
    return C.load(QUICKSTART, ["search.points_to_evaluate=[]", *overrides])


def _sample(cfg, n):
    space = search_space(cfg)
    study = optuna.create_study(sampler=make_sampler(cfg.search, 0, space))
    study.optimize(lambda t: suggest(space, t) or 0.0, n_trials=n)
    return [t.params for t in study.trials]


def test_conditional_entry_only_when_its_parent_allows_it():
    for params in _sample(_cfg(SPACE, "search.algorithm=random"), 40):
        assert ("sharpening.keep_frac" in params) == (params["sharpening.strategy"] == "per_class")
        factor = params["sae.expansion_factor"]
        assert isinstance(factor, int) and 2 <= factor <= 64
    # every sampled point is a valid trial config (the inactive entry keeps the YAML value)
    cfg = _cfg(SPACE)
    trial = C.apply_params(cfg, {"sharpening.strategy": "none", "sae.expansion_factor": 3})
    assert trial.sharpening.keep_frac == cfg.sharpening.keep_frac == 0.5


def test_intlog_samples_small_values_more_often():
    factors = [
        p["sae.expansion_factor"] for p in _sample(_cfg(SPACE, "search.algorithm=random"), 200)
    ]
    below = sum(f < 11 for f in factors)  # 11 ~ geometric midpoint of 2..64
    assert 0.35 < below / len(factors) < 0.65  # uniform-in-log; uniform would give ~0.14


def test_grid_runs_every_combination_once():
    cfg = _cfg(
        "search.algorithm=grid",
        "search.space={sae.k: {type: choice, values: [4, 8]}, "
        "sae.expansion_factor: {type: int, low: 2, high: 6, step: 2}}",
    )
    n = num_trials(cfg)
    assert n == 6
    combos = {(p["sae.k"], p["sae.expansion_factor"]) for p in _sample(cfg, n)}
    assert combos == {(k, e) for k in (4, 8) for e in (2, 4, 6)}


@pytest.mark.parametrize(
    "override, field",
    [
        ("search.space={sae.k: {type: intlog, low: 0, high: 8}}", "search.space.sae.k"),
        ("search.space={sae.lr: {type: uniform, low: 0.1, high: 0.2, when: {sae.x: 1}}}", "when"),
        ("search.objectives=[{metric: interp/u}, {metric: interp/u}]", "listed twice"),
        ("search.algorithm=grid", "grid needs choice"),
        ("search.constraints=[{metric: val/accuracy}]", "min"),
    ],
)
def test_bad_search_sections_name_the_field(override, field):
    space = "search.space={sae.lr: {type: uniform, low: 0.001, high: 0.01}}"
    with pytest.raises(C.ConfigError, match=field):
        extra = [] if "search.space" in override else [space]
        _cfg(*extra, override)
    two = "search.objectives=[{metric: interp/u}, {metric: val/accuracy}]"
    multi = _cfg(two, "search.scheduler=none")
    assert len(multi.search.goals()) == 2
    with pytest.raises(C.ConfigError, match="asha"):
        _cfg(two, "search.scheduler=asha")


def test_violation_against_bounds_and_the_cycle0_drop():
    constraints = [
        C.Constraint(metric="val/accuracy", max_drop=0.005),
        C.Constraint(metric="sae/fvu", max=0.2),
    ]
    first = {"val/accuracy": 0.90, "sae/fvu": 0.1}
    assert violation(constraints, {"val/accuracy": 0.896, "sae/fvu": 0.2}, first) == 0
    assert violation(constraints, {"val/accuracy": 0.89, "sae/fvu": 0.1}, first) == (
        pytest.approx(0.005)
    )
    assert violation(constraints, {"val/accuracy": 0.9, "sae/fvu": 0.5}, first) == (
        pytest.approx(0.3)
    )
    with pytest.raises(ValueError, match="'nope' is not a metric a trial reports"):
        C.Constraint(metric="nope", min=0)  # refused when the sweep is read
    unreported = C.Constraint.model_construct(metric="interp/u", min=0.0, max=None, max_drop=None)
    with pytest.raises(C.ConfigError, match="search.constraints: interp/u"):
        violation([unreported], {}, {})  # and a trial that did not report it says so


def test_reporter_adds_best_cycle_objective_and_feasibility():
    cfg = _cfg(
        "search.objectives=[{metric: interp/u, at: best}, {metric: val/accuracy}]",
        "search.constraints=[{metric: val/accuracy, max_drop: 0.005}]",
    )
    seen = []
    report = objective_reporter(cfg.search, seen.append)
    for u, acc in ((0.3, 0.9), (0.5, 0.899), (0.4, 0.8)):
        report({"interp/u": u, "val/accuracy": acc})
    assert [r["best/interp/u"] for r in seen] == [0.3, 0.5, 0.5]
    assert [r["feasible"] for r in seen] == [True, True, False]
    assert seen[2][VIOLATION] == pytest.approx(0.095)


def test_searcher_hands_the_violation_to_optuna_constraints():
    cfg = _cfg(SPACE, "search.constraints=[{metric: val/accuracy, min: 0.9}]")
    searcher = make_searcher(cfg)
    assert searcher.suggest("t1") is not None
    searcher.on_trial_complete("t1", {"interp/u": 0.4, VIOLATION: 0.25})
    frozen = searcher._ot_study.trials[0]
    assert frozen.constraints == {"violation": 0.25}  # what TPE and NSGA-II read


ROWS = [  # final cycles of five trials; b is infeasible, e failed
    {"trial_id": "a", "cycle": 1, "interp/u": 0.3, "val/accuracy": 0.95, "feasible": True},
    {"trial_id": "b", "cycle": 1, "interp/u": 0.9, "val/accuracy": 0.99, "feasible": False},
    {"trial_id": "c", "cycle": 1, "interp/u": 0.5, "val/accuracy": 0.90, "feasible": True},
    {"trial_id": "d", "cycle": 1, "interp/u": 0.2, "val/accuracy": 0.91, "feasible": True},
    {"trial_id": "e", "cycle": None, "status": "ERROR", "error": "boom"},
]


def _rows():
    rows = [dict(r) for r in ROWS]
    for i, r in enumerate(rows):
        r.setdefault("status", "COMPLETE")
        r.setdefault("error", "")
        r["sae.k"] = [4, 8, 16, 4, 8][i]
    return rows


def test_pareto_front_has_no_dominated_member_and_skips_infeasible():
    cfg = _cfg("search.objectives=[{metric: interp/u}, {metric: val/accuracy}]")
    goals = cfg.search.goals()
    front = pareto_front(_rows(), goals)
    assert {r["trial_id"] for r in front} == {"a", "c"}  # d is dominated by a; b infeasible
    keys = [g.key for g in goals]  # both maximised here

    def dominates(a, b):  # written out here, independent of the module's rule
        return all(a[k] >= b[k] for k in keys) and any(a[k] > b[k] for k in keys)

    for r in front:
        assert not any(dominates(o, r) for o in _rows()[:4] if o["feasible"])


def test_outputs_best_json_and_a_reloadable_study(tmp_path):
    cfg = _cfg(
        f"experiment.storage_path={tmp_path}",
        "search.space={sae.k: {type: choice, values: [4, 8, 16]}}",
    )
    write_outputs(_rows(), cfg)
    best = json.loads((cfg.sweep_dir / "best.json").read_text())
    assert best["best"]["trial_id"] == "c" and best["best"]["params"] == {"sae.k": 16}
    assert best["feasible"] == 3 and best["trials"] == 5
    study = optuna.load_study(
        study_name=cfg.experiment.name, storage=f"sqlite:///{cfg.sweep_dir / 'optuna.db'}"
    )
    assert len(study.trials) == 5
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.value for t in done) == sorted([0.3, 0.9, 0.5, 0.2])
    assert math.isclose(study.best_value, 0.9)  # Optuna's own view ignores feasibility...
    assert {t.user_attrs["trial_id"]: t.user_attrs["feasible"] for t in done}["b"] is False
    multi = best_summary(
        _rows(), _cfg("search.objectives=[{metric: interp/u}, {metric: val/accuracy}]")
    )
    assert {e["trial_id"] for e in multi["pareto_front"]} == {"a", "c"}


def test_asha_stops_on_the_cycle_count_and_the_objective():
    from ray.tune.schedulers import ASHAScheduler

    from sae_ray.sweep.tuner import make_scheduler

    cfg = _cfg("search.scheduler=asha", "cycles.count=4", "search.metric=interp/u")
    asha = make_scheduler(cfg)
    assert isinstance(asha, ASHAScheduler)
    assert asha._time_attr == "training_iteration" and asha._max_t == 4
    assert asha.metric == "interp/u" and asha._metric_op == 1.0  # max
    assert make_scheduler(_cfg()) is None
    best = _cfg("search.scheduler=asha", "search.objectives=[{metric: interp/u, at: best}]")
    assert make_scheduler(best).metric == "best/interp/u"
