"""A finished sweep's outputs written the way a sweep writes them, from made-up numbers: the
report's tests need its files, not the hours a real sweep takes (the quickstart fixture
checks a real one)."""

from __future__ import annotations

import json

import numpy as np

from sae_ray import storage
from sae_ray.config import Config
from sae_ray.sweep.results import write_config, write_outputs

STRATEGIES = ["per_class", "none", "per_example", "random", "per_class", "per_example"]


def fake_sweep(
    storage_path: str, name: str = "fake", failed: bool = True, seeds: int = 0
) -> Config:
    """`seeds`: that many per-seed rows per trial and cycle (the workers' seed files, each
    seed's metrics off the trial's by a little), as `search.seeds` makes."""
    cfg = Config.model_validate(
        {
            "experiment": {"name": name, "storage_path": storage_path},
            "cycles": {"count": 3},
            "wandb": {"mode": "offline"},
            "search": {
                "num_samples": len(STRATEGIES),
                "metric": "interp/u",
                "mode": "max",
                "space": {
                    "sae.k": {"type": "choice", "values": [4, 8, 16]},
                    "sae.expansion_factor": {"type": "choice", "values": [2, 4]},
                    "sharpening.strategy": {
                        "type": "choice",
                        "values": ["per_class", "per_example", "random", "none"],
                    },
                },
            },
        }
    )
    rng = np.random.default_rng(0)
    rows = []
    for t, strategy in enumerate(STRATEGIES):
        k, ef = [4, 8, 16][t % 3], [2, 4][t % 2]
        for cycle in range(3):
            gain = {"none": 0.0, "per_class": 0.03, "per_example": 0.02, "random": -0.01}[strategy]
            rows.append(
                {
                    "trial_id": f"{t:08x}",
                    "cycle": cycle,
                    "sae.k": k,
                    "sae.expansion_factor": ef,
                    "sharpening.strategy": strategy,
                    "strategy_effective": strategy,
                    "is_control": strategy == "none",
                    "interp/u": 0.2 + gain * cycle + 0.01 * k / 16 + rng.normal(0, 0.005),
                    "val/accuracy": 0.9
                    - 0.01 * cycle * (strategy != "none")
                    + rng.normal(0, 0.005),
                    "test/accuracy": 0.88
                    - 0.01 * cycle * (strategy != "none")
                    + rng.normal(0, 0.005),
                    "sae/fvu": 0.3 - 0.01 * k / 4,
                    "sae/l0": float(k),
                    "features/log10_density_hist": json.dumps(
                        [int(v) for v in rng.integers(0, 5 * k, 14)]
                    ),
                    "structure/dict_overlap": 1.0 - 0.1 * cycle * (strategy != "none"),
                    "delta/features/firing_gini": 0.02 * cycle * (strategy != "none"),
                    "status": "COMPLETE",
                    "error": "",
                }
            )
    if failed:
        rows.append(
            {
                "trial_id": "deadbeef",
                "cycle": None,
                "sae.k": 16,
                "sae.expansion_factor": 2,
                "sharpening.strategy": "random",
                "status": "ERROR",
                "error": "ValueError: model.layer: 5 is out of range",
            }
        )
    for row in rows if seeds else []:
        if row["status"] != "COMPLETE":
            continue
        per_seed = [
            {"seed": s, **{m: row[m] + rng.normal(0, 0.005) for m in ("interp/u", "val/accuracy")}}
            for s in range(seeds)
        ]
        where = storage.join(cfg.seeds_uri, f"{row['trial_id']}-c{row['cycle']}.json")
        storage.write_bytes(where, json.dumps(per_seed).encode())
    write_config(cfg)
    write_outputs(rows, cfg)
    return cfg
