"""The sweep's own numbers on Ray's metrics endpoint (the dashboard's Metrics view, Grafana,
any Prometheus), beside Ray Data's and Ray Train's: all named `sae_ray_*`, tagged by sweep.

Every call is a no-op outside a Ray process, so the stages stay usable without Ray.
"""

from __future__ import annotations

import math
from functools import cache

import ray


@cache
def _metric(kind: str, name: str, description: str, tag_keys: tuple[str, ...]):
    from ray.util import metrics

    return getattr(metrics, kind)(name, description=description, tag_keys=tag_keys)


def _emit(kind: str, name: str, description: str, value: float, tags: dict[str, str]) -> None:
    if not ray.is_initialized() or not math.isfinite(value):
        return
    metric = _metric(kind, name, description, tuple(sorted(tags)))
    if kind == "Counter":
        metric.inc(value, tags=tags)
    else:
        metric.set(value, tags=tags)


def node() -> str:
    """This process's Ray node id (as the dashboard's Cluster page lists it), or "local"
    outside Ray."""
    if not ray.is_initialized():
        return "local"
    return ray.get_runtime_context().get_node_id()


def trial_ended(sweep: str, outcome: str) -> None:
    """outcome: 'finished' or 'errored'."""
    _emit(
        "Counter",
        f"sae_ray_trials_{outcome}",
        f"trials of the sweep that {outcome}",
        1.0,
        {"sweep": sweep},
    )


def best_objective(sweep: str, metric: str, value: float) -> None:
    _emit(
        "Gauge",
        "sae_ray_best_objective",
        "best feasible value of each objective so far",
        value,
        {"sweep": sweep, "metric": metric},
    )


def sae_tokens_per_s(sweep: str, hookpoint: str, value: float) -> None:
    _emit(
        "Gauge",
        "sae_ray_sae_tokens_per_s",
        "SAE training throughput, all workers (node: rank 0's)",
        value,
        {"sweep": sweep, "hookpoint": hookpoint, "node": node()},
    )


def extraction_rows_per_s(sweep: str, value: float) -> None:
    _emit(
        "Gauge",
        "sae_ray_extraction_rows_per_s",
        "token rows extracted and written per second (node: rank 0's)",
        value,
        {"sweep": sweep, "node": node()},
    )
