"""Sweep YAML -> Ray Tune run: OptunaSearch over the dotted space, one function trial each.

The space is define-by-run (Optuna's own way to express conditional parameters); TPE,
NSGA-II, random and grid are Optuna samplers behind Tune's `OptunaSearch`. Constraints go
to the samplers as Optuna constraint values (infeasible trials inform the search but are
never best). Each trial only reserves its driver (no CPU); its TorchTrainers ask for their
workers when they start. Concurrency is sized so that running trials' workers never take
the last CPU, which Ray Data's read tasks need (the Tune + Train deadlock DESIGN.md
describes).
"""

from __future__ import annotations

import functools
import logging
import math
import os
from typing import Any

import optuna
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from sae_ray import storage, telemetry
from sae_ray.config import (
    CONTROL,
    Config,
    ConfigError,
    Constraint,
    Search,
    SpaceEntry,
    apply_params,
    effective_strategy,
)
from sae_ray.config.metrics import task_metrics
from sae_ray.sweep.cluster import capacity
from sae_ray.sweep.comparison import STRATEGY
from sae_ray.sweep.progress import SweepProgress
from sae_ray.sweep.results import collect_results, write_config, write_outputs
from sae_ray.sweep.space import (
    grid_values,
    make_sampler,
    planned_points,
    search_space,
    suggest,
)
from sae_ray.trial.driver import TrialFailed, run_trial
from sae_ray.trial.record import TrialRecord

log = logging.getLogger(__name__)
DRIVER_RESOURCES = {"cpu": 0, "memory": 1 << 20}  # an empty request is refused
VIOLATION = "constraint/violation"


def with_control(cfg: Config) -> Config:
    """The sweep with its λ = 0 control trial added, unless it has one or asked for none.

    The control is enqueued first with the first point's other settings (same SAE, same
    epochs: equal compute) and counts on top of `num_samples`; 'none' joins the strategy
    choices so the searcher knows the value (a grid then simply includes it)."""
    search = cfg.search
    points = list(search.points_to_evaluate)
    # a point is the control only by what it sets itself (the rest is sampled)
    already = any(
        effective_strategy(p.get(STRATEGY), p.get("cycles.aux_weight")) == CONTROL for p in points
    )
    always = cfg.strategy == CONTROL
    if cfg.ground_truth:  # no model to sharpen: nothing to control for
        return cfg
    if not search.control or already or (always and STRATEGY not in search.space):
        return cfg
    space = dict(search.space)
    entry = space.get(STRATEGY)
    if entry is None:
        space[STRATEGY] = SpaceEntry(type="choice", values=[cfg.sharpening.strategy, "none"])
    elif "none" not in (entry.values or []):
        space[STRATEGY] = entry.model_copy(update={"values": [*entry.values, "none"]})
    update: dict[str, Any] = {"space": space}
    if search.algorithm != "grid":
        control = {**(points[0] if points else {}), STRATEGY: "none"}
        update.update(points_to_evaluate=[control, *points], num_samples=search.num_samples + 1)
    return cfg.model_copy(update={"search": search.model_copy(update=update)})


class ConstrainedOptunaSearch(OptunaSearch):
    """OptunaSearch that hands each finished trial's constraint violation to Optuna
    (`Trial.set_constraint`, which TPE and NSGA-II read) before telling the study."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and result and VIOLATION in result:
            ot_trial.set_constraint("violation", float(result[VIOLATION]))
        super().on_trial_complete(trial_id, result, error)


def make_searcher(cfg: Config) -> OptunaSearch:
    space = search_space(cfg)
    goals = cfg.search.goals()
    keys = [g.key for g in goals]
    modes = [g.mode for g in goals]
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "a new study created"
    return ConstrainedOptunaSearch(
        space=functools.partial(suggest, space),
        metric=keys if len(keys) > 1 else keys[0],
        mode=modes if len(modes) > 1 else modes[0],
        sampler=make_sampler(cfg.search, cfg.experiment.seed, space),
        points_to_evaluate=cfg.search.points_to_evaluate or None,
    )


def num_trials(cfg: Config) -> int:
    if cfg.search.algorithm == "grid":
        return math.prod(len(grid_values(e)) for e in cfg.search.space.values())
    return cfg.search.num_samples


def make_scheduler(cfg: Config):
    if cfg.search.scheduler != "asha":
        return None
    goal = cfg.search.goals()[0]
    return tune.schedulers.ASHAScheduler(
        time_attr="training_iteration",  # one report per cycle
        metric=goal.key,
        mode=goal.mode,
        max_t=cfg.cycles.count,
        grace_period=min(cfg.search.grace_cycles, cfg.cycles.count),
        reduction_factor=cfg.search.reduction_factor,
    )


def max_concurrent_trials(cfg: Config, cluster: dict[str, float]) -> int:
    """Trials that fit with one CPU left for Ray Data: driver CPU(0) + n·workers·cpu ≤ CPUs − 1
    (CPUs: what the cluster may grow to, `sweep.cluster.capacity`)."""
    per_trial = cfg.resources.num_workers * cfg.resources.cpus_per_worker
    spare = cluster.get("CPU", 0) - 1
    if math.isinf(spare):  # an autoscaler adds nodes as trials wait for them
        return cfg.search.max_concurrent_trials or 0  # 0: Tune's "no limit"
    if per_trial > spare:
        raise ConfigError(
            f"resources.num_workers: {cfg.resources.num_workers} workers x "
            f"{cfg.resources.cpus_per_worker} CPU need {per_trial:g} CPUs plus 1 for Ray Data, "
            f"the cluster has {cluster.get('CPU', 0):g}"
        )
    fit = math.floor(spare / per_trial)
    if cfg.resources.use_gpu:
        gpus = cluster.get("GPU", 0)
        if gpus < cfg.resources.num_workers:
            raise ConfigError(
                f"resources.use_gpu: {cfg.resources.num_workers} GPU workers "
                f"requested, the cluster has {gpus:g} GPUs"
            )
        fit = min(fit, math.floor(gpus / cfg.resources.num_workers))
    if cfg.search.max_concurrent_trials:
        fit = min(fit, cfg.search.max_concurrent_trials)
    return max(1, fit)


def violation(constraints: list[Constraint], metrics: dict, first: dict) -> float:
    """How far a cycle's metrics are outside the constraints, summed (0 when feasible)."""
    total = 0.0
    for c in constraints:
        if c.metric not in metrics:
            raise ConfigError(f"search.constraints: {c.metric} is not a reported metric")
        value = float(metrics[c.metric])
        if c.min is not None:
            total += max(0.0, c.min - value)
        if c.max is not None:
            total += max(0.0, value - c.max)
        if c.max_drop is not None:
            total += max(0.0, float(first[c.metric]) - value - c.max_drop)
        if c.max_rise_pct is not None:  # in percent of the cycle-0 value
            rise = 100.0 * (value / float(first[c.metric]) - 1.0)
            total += max(0.0, rise - c.max_rise_pct)
    return total


def objective_reporter(search: Search, report):
    """Wrap a per-cycle report: add each 'best'-cycle objective's running best, and the
    constraint violation against cycle 0, so the searcher and ASHA read them directly."""
    first: dict[str, Any] = {}
    best: dict[str, float] = {}

    def wrapped(metrics: dict[str, Any]) -> None:
        metrics = dict(metrics)
        if not first:
            first.update(metrics)
        for goal in search.goals():
            if goal.at == "best":
                value = float(metrics[goal.metric])
                best[goal.key] = goal.best(best.get(goal.key, value), value)
                metrics[goal.key] = best[goal.key]
        if search.constraints:
            metrics[VIOLATION] = violation(search.constraints, metrics, first)
            metrics["feasible"] = metrics[VIOLATION] == 0
        report(metrics)

    return wrapped


def _trainable(params: dict[str, Any], base: dict[str, Any], plan: list[dict[str, Any]]) -> None:
    """One trial. A trial that failed deterministically (`TrialFailed`: bad settings at a
    stage, NaN or Inf) fails again at once when Tune retries it (`resources.trial_retries`
    are for lost nodes and killed drivers), without starting a worker group to repeat it."""
    cfg = apply_params(Config.model_validate(base), params)
    record = TrialRecord(cfg, tune.get_context().get_trial_id())
    earlier = record.failure()
    if earlier is not None:
        raise TrialFailed(earlier)
    try:
        report = objective_reporter(cfg.search, tune.report)
        with record.running(params):  # trials beside it may co-train its SAEs
            run_trial(cfg, report=report, trial_id=record.trial_id, plan=plan)
    except TrialFailed as err:
        record.fail(str(err))
        raise


class SweepMetrics(tune.Callback):
    """Trials finished / errored and the best feasible objective so far, on Ray's metrics
    endpoint (see telemetry.py), from the sweep driver."""

    def __init__(self, sweep: str, goals: list):
        self.sweep = sweep
        self.goals = goals
        self.best: dict[str, float] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("feasible") is False:
            return
        for goal in self.goals:
            value = result.get(goal.key)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            self.best[goal.key] = goal.best(self.best.get(goal.key, value), value)
            telemetry.best_objective(self.sweep, goal.key, self.best[goal.key])

    def on_trial_complete(self, iteration, trials, trial, **info):
        telemetry.trial_ended(self.sweep, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        telemetry.trial_ended(self.sweep, "errored")


def _trial_name(trial) -> str:
    """Short and stable: the default packs every parameter into the folder name."""
    return f"trial_{trial.trial_id}"


def _callbacks(cfg: Config) -> list:
    goals = cfg.search.goals()
    callbacks = [
        SweepMetrics(cfg.experiment.name, goals),
        SweepProgress(
            cfg.experiment.name,
            list(cfg.search.space),
            goals,
            cfg.cycles.count,
            # the column beside the objectives: the model's own quality, or what MCC costs
            beside=["gt/f1"] if cfg.ground_truth else task_metrics(cfg.is_lm)[:1],
        ),
    ]
    if cfg.wandb.mode == "disabled":
        return callbacks
    import wandb

    from sae_ray.sweep.wandb_log import SweepWandb, flat_config, runs_root

    # The callback's own mode= is not enough offline: wandb reads the environment.
    os.environ["WANDB_MODE"] = cfg.wandb.mode
    os.environ.setdefault("WANDB_SILENT", "true")  # one summary per trial floods the console
    return [
        *callbacks,
        SweepWandb(
            flat_config(cfg),
            runs_root(cfg),
            project=cfg.wandb.project,
            group=cfg.experiment.name,
            mode=cfg.wandb.mode,
            log_config=True,
            # Each trial's logger actor would print its run's whole summary when it ends.
            settings=wandb.Settings(silent=True, console="off"),
        ),
    ]


def check_resumable(cfg: Config) -> None:
    """`--resume` needs the Tune state of an earlier run of this sweep (checked before Ray
    starts: it reads only the storage)."""
    if not tune.Tuner.can_restore(cfg.sweep_uri):
        raise ConfigError(f"--resume: no sweep to resume at {cfg.sweep_uri}")


def _tuner(cfg: Config, resume: bool) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=cfg.model_dump(), plan=planned_points(cfg)),
        DRIVER_RESOURCES,
    )
    callbacks = _callbacks(cfg)
    if resume:
        check_resumable(cfg)
        # Unfinished trials run on (their finished cycles' artifacts are reused); completed
        # and errored ones are kept as they are.
        return tune.Tuner.restore(cfg.sweep_uri, trainable, resume_unfinished=True)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(cfg),
            scheduler=make_scheduler(cfg),
            num_samples=num_trials(cfg),
            max_concurrent_trials=max_concurrent_trials(cfg, capacity()),
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=cfg.experiment.name,
            storage_path=storage.resolve(cfg.experiment.storage_path),
            callbacks=callbacks,
            failure_config=tune.FailureConfig(max_failures=cfg.resources.trial_retries),
            verbose=0,  # progress.SweepProgress prints the table instead
        ),
    )


def run_sweep(cfg: Config, resume: bool = False) -> list[dict[str, Any]]:
    """Run (or resume) the sweep on the connected Ray cluster; write results.csv, best.json
    and the Optuna study; return the result rows."""
    write_config(cfg)
    grid = _tuner(cfg, resume).fit()
    if cfg.wandb.mode != "disabled":
        from sae_ray.sweep.wandb_log import publish_runs

        publish_runs(cfg)
    rows = collect_results(grid, list(cfg.search.space))
    write_outputs(rows, cfg)
    return rows
