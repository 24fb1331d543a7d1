"""Sweep YAML -> Ray Tune run: OptunaSearch over the dotted space, one function trial each.

Each trial only reserves its driver (no CPU); the SAE's TorchTrainer asks for its workers
when it starts. Concurrency is sized so that running trials' workers never take the last CPU,
which Ray Data's read tasks need (the Tune + Train deadlock DESIGN.md describes).
"""

from __future__ import annotations

import math
import os
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from sae_ray.config import Config, ConfigError, SpaceEntry, apply_params
from sae_ray.cycle import run_trial
from sae_ray.results import collect_results, write_results

DRIVER_RESOURCES = {"cpu": 0, "memory": 1 << 20}  # an empty request is refused


STRATEGY = "sharpening.strategy"


def with_control(cfg: Config) -> Config:
    """The sweep with its λ = 0 control trial added, unless it has one or asked for none.

    The control is enqueued first with the first point's other settings (same SAE, same
    epochs: equal compute) and counts on top of `num_samples`; 'none' joins the strategy
    choices so the searcher knows the value."""
    search = cfg.search
    points = list(search.points_to_evaluate)
    already = any(p.get(STRATEGY) == "none" or p.get("cycles.aux_weight") == 0 for p in points)
    always = cfg.sharpening.strategy == "none" or cfg.cycles.aux_weight == 0
    if not search.control or already or (always and STRATEGY not in search.space):
        return cfg
    space = dict(search.space)
    entry = space.get(STRATEGY)
    if entry is None:
        space[STRATEGY] = SpaceEntry(type="choice", values=[cfg.sharpening.strategy, "none"])
    elif "none" not in (entry.values or []):
        space[STRATEGY] = entry.model_copy(update={"values": [*entry.values, "none"]})
    control = {**(points[0] if points else {}), STRATEGY: "none"}
    update = {
        "space": space,
        "points_to_evaluate": [control, *points],
        "num_samples": search.num_samples + 1,
    }
    return cfg.model_copy(update={"search": search.model_copy(update=update)})


def tune_domain(entry: SpaceEntry):
    if entry.type == "choice":
        return tune.choice(entry.values)
    if entry.type == "int":
        low, high = int(entry.low), int(entry.high)
        return tune.qrandint(low, high, entry.step) if entry.step else tune.randint(low, high + 1)
    if entry.type == "loguniform":
        return tune.loguniform(entry.low, entry.high)
    return tune.uniform(entry.low, entry.high)


def search_space(cfg: Config) -> dict[str, Any]:
    if not cfg.search.space:
        raise ConfigError("search.space: a sweep needs at least one searched parameter")
    return {dotted: tune_domain(entry) for dotted, entry in cfg.search.space.items()}


def make_searcher(cfg: Config) -> OptunaSearch:
    seed = cfg.experiment.seed
    if cfg.search.algorithm == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    return OptunaSearch(
        metric=cfg.search.metric,
        mode=cfg.search.mode,
        sampler=sampler,
        points_to_evaluate=cfg.search.points_to_evaluate or None,
    )


def max_concurrent_trials(cfg: Config, cluster: dict[str, float]) -> int:
    """Trials that fit with one CPU left for Ray Data: driver CPU(0) + n·workers·cpu ≤ CPUs − 1."""
    per_trial = cfg.resources.num_workers * cfg.resources.cpus_per_worker
    spare = cluster.get("CPU", 0) - 1
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


def _trainable(params: dict[str, Any], base: dict[str, Any]) -> None:
    cfg = apply_params(Config.model_validate(base), params)
    run_trial(cfg, report=tune.report)


def _trial_name(trial) -> str:
    """Short and stable: the default packs every parameter into the folder name."""
    return f"trial_{trial.trial_id}"


def _callbacks(cfg: Config) -> list:
    if cfg.wandb.mode == "disabled":
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    # The callback's own mode= is not enough offline: wandb reads the environment.
    os.environ["WANDB_MODE"] = cfg.wandb.mode
    os.environ.setdefault("WANDB_SILENT", "true")  # one summary per trial floods the console
    os.environ.setdefault("WANDB_DIR", str(cfg.sweep_dir))
    cfg.sweep_dir.mkdir(parents=True, exist_ok=True)
    return [
        WandbLoggerCallback(
            project=cfg.wandb.project,
            group=cfg.experiment.name,
            mode=cfg.wandb.mode,
            log_config=True,
        )
    ]


def run_sweep(cfg: Config) -> list[dict[str, Any]]:
    """Run the sweep on the connected Ray cluster and write results.csv; returns its rows."""
    space = search_space(cfg)
    concurrency = max_concurrent_trials(cfg, ray.cluster_resources())
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=cfg.model_dump()), DRIVER_RESOURCES
    )
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=make_searcher(cfg),
            num_samples=cfg.search.num_samples,
            max_concurrent_trials=concurrency,
            trial_name_creator=_trial_name,
            trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=cfg.experiment.name,
            storage_path=str(cfg.sweep_dir.parent),
            callbacks=_callbacks(cfg),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=1,
        ),
    )
    grid = tuner.fit()
    rows = collect_results(grid, list(cfg.search.space))
    write_results(rows, cfg.sweep_dir / "results.csv")
    return rows
