"""The search space as Optuna sees it, and what a sweep knows of its points before it
starts: the define-by-run space (conditional entries), the samplers, a grid's every point,
a random search's points drawn up front (`planned_points`: the points whose SAE fits
trials co-train, `method/cofit.py`)."""

from __future__ import annotations

import itertools
from typing import Any

import optuna

from sae_ray.config import Config, ConfigError, Search, SpaceEntry


def search_space(cfg: Config) -> dict[str, SpaceEntry]:
    """The searched entries, parents before the entries conditional on them."""
    if not cfg.search.space:
        raise ConfigError("search.space: a sweep needs at least one searched parameter")
    if cfg.search.algorithm == "grid" and cfg.search.points_to_evaluate:
        raise ConfigError("search.points_to_evaluate: a grid runs every point already")
    return dict(sorted(cfg.search.space.items(), key=lambda item: item[1].when is not None))


def grid_values(entry: SpaceEntry) -> list[Any]:
    if entry.type == "choice":
        return list(entry.values or [])
    return list(range(int(entry.low), int(entry.high) + 1, entry.step or 1))


def suggest(space: dict[str, SpaceEntry], trial: optuna.Trial) -> dict[str, Any]:
    """Define-by-run: each active entry asks the Optuna trial for a value (returned too)."""
    params: dict[str, Any] = {}
    for dotted, entry in space.items():
        if not entry.allows(params):
            continue
        low, high = entry.low, entry.high
        if entry.type == "choice":
            params[dotted] = trial.suggest_categorical(dotted, entry.values)
        elif entry.type in ("int", "intlog"):
            log_scale = entry.type == "intlog"
            step = 1 if log_scale else entry.step or 1
            params[dotted] = trial.suggest_int(
                dotted, int(low), int(high), step=step, log=log_scale
            )
        else:
            params[dotted] = trial.suggest_float(dotted, low, high, log=entry.type == "loguniform")
    return params


def drawn_ahead(cfg: Config) -> Config:
    """A random search with its points drawn before the sweep starts (Optuna's
    RandomSampler seeded by `experiment.seed`, the distribution the searcher draws from)
    and run as its `points_to_evaluate` (a given point's open parameters drawn too). A
    random search does not adapt to results, so nothing is lost, and every trial then knows
    every point (`planned_points`: SAE fits on shared activations train together)."""
    search = cfg.search
    if search.algorithm != "random":
        return cfg
    space = search_space(cfg)
    sampler = optuna.samplers.RandomSampler(seed=cfg.experiment.seed)
    study = optuna.create_study(sampler=sampler)
    for given in search.points_to_evaluate:  # what a given point leaves open is drawn
        study.enqueue_trial(given)
    points = [suggest(space, study.ask()) for _ in range(search.num_samples)]
    return cfg.model_copy(
        update={"search": search.model_copy(update={"points_to_evaluate": points})}
    )


def make_sampler(search: Search, seed: int, space: dict[str, SpaceEntry]):
    if search.algorithm == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
    if search.algorithm == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if search.algorithm == "grid":
        return optuna.samplers.GridSampler({k: grid_values(e) for k, e in space.items()}, seed)
    return optuna.samplers.RandomSampler(seed=seed)


def planned_points(cfg: Config) -> list[dict[str, Any]]:
    """The points the sweep will run, known before it starts: a grid's every combination,
    or the `points_to_evaluate` that set every parameter they sample (the rest are sampled
    as the search goes). Trials co-train these points' SAEs where they share activations
    (`method/cofit.py`); none without shared artifacts."""
    space = cfg.search.space
    if not cfg.experiment.share_artifacts:
        return []
    if cfg.search.algorithm == "grid":
        names = list(space)
        combos = itertools.product(*(grid_values(space[n]) for n in names))
        return [dict(zip(names, combo, strict=True)) for combo in combos]
    return [
        p
        for p in cfg.search.points_to_evaluate[: cfg.search.num_samples]  # those that run
        if all(name in p for name, entry in space.items() if entry.allows(p))
    ]
