"""A trial at a point that has run to its end before, in this sweep's store, is replayed
from its record instead of run again.

An adaptive search re-suggests points of a discrete space (TPE over a few k, expansion and
strategy values does, often). The rerun would find every stage in the artifact store and
report the same numbers, but only after starting a Ray Train run (seconds of process
starts) and loading each cycle's model to look its stages up (minutes for a large model).
Its record, the numbers each cycle reported and each seed's rows, is an artifact keyed by
everything that decides them: the trial's whole config but the search (besides its seeds)
and W&B. A replayed cycle says it computed nothing and took no time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sae_ray import storage
from sae_ray.config import Config
from sae_ray.storage.artifacts import ArtifactStore

TRIAL = "trial"  # the record's artifact kind
RECORD = "cycles.json"
NO_WORKER = ("memory/worker_peak_mb",)  # what a replay has no value for


def trial_spec(cfg: Config) -> dict[str, Any]:
    """What decides a trial's numbers (a mismatch only costs a rerun, never a wrong replay)."""
    spec = cfg.model_dump(mode="json", exclude={"search", "wandb"})
    spec["seeds"] = cfg.search.seeds
    if cfg.search.seeds_vary != "experiment":  # (only then: earlier records keep their key)
        spec["seeds_vary"] = cfg.search.seeds_vary
    return spec


def recorded(store: ArtifactStore, cfg: Config) -> list[dict[str, Any]] | None:
    """The cycles of the earlier run of this point, or None."""
    art = store.find(TRIAL, trial_spec(cfg))
    return None if art is None else json.loads((art.local() / RECORD).read_text())


def report_again(
    cycles: list[dict[str, Any]], report: Callable[[dict[str, Any]], None], seeds: str
) -> None:
    """Report each recorded cycle again, with its seeds' rows written where this trial's go
    (`seeds`: a location with `{}` for the cycle)."""
    for cycle, entry in enumerate(cycles):
        storage.write_bytes(seeds.format(cycle), json.dumps(entry["seeds"]).encode())
        metrics = {
            k: 0.0 if k.startswith("time/") else v
            for k, v in entry["metrics"].items()
            if k not in NO_WORKER
        }
        metrics["artifacts/computed"] = 0
        report(metrics)


def keep(store: ArtifactStore, cfg: Config, reported: list[dict[str, Any]], seeds: str) -> None:
    """Keep a finished trial's cycles (`reported`: what it reported, in order; `seeds`: where
    its seeds' rows are)."""
    if len(reported) != cfg.cycles.count:
        return  # stopped early (a scheduler's decision): a rerun may go further
    cycles = [
        {"metrics": metrics, "seeds": json.loads(storage.read_bytes(seeds.format(cycle)))}
        for cycle, metrics in enumerate(reported)
    ]

    def write(out: Path) -> None:
        (out / RECORD).write_text(json.dumps(cycles, default=float))

    store.get_or_compute(TRIAL, trial_spec(cfg), write)
