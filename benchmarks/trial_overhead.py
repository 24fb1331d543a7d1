"""Trial overhead: how much of one trial's wall time is its stages' own work. Target >= 0.6
(the stages' time, measured inside the Train workers, over the trial's wall time, measured
by its driver), and the trial starts one worker group.

One trial of the quickstart config (per_class, k 8, x4, 2 cycles, 2 workers) at 4x its
examples, on a fresh local Ray cluster: `run_trial`, as a sweep's trial or `sae-ray run`
calls it. The stages' times are the `time/*_s` columns each cycle reports (rank 0's clock
around each stage: fine-tunes, extraction, SAE fits, evaluation, sharpening); what is left
is starting the worker group, the processes' imports, Ray Data's start, reports.
The worker groups are counted from Ray's state API (Train worker actors / workers per group).

    python -m benchmarks.trial_overhead
    python -m benchmarks.trial_overhead --examples 1200 --cycles 1
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.common import device_name, emit
from sae_ray import config as C
from sae_ray.trial.driver import run_trial

QUICKSTART = Path(__file__).parents[1] / "sweeps" / "quickstart.yaml"
STAGES = ("model", "activations", "sae", "evaluate", "targets")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4800, help="quickstart's 1200 x 4")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=2, help="the local Ray cluster's CPUs")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.load(
            QUICKSTART,
            [
                f"experiment.storage_path={tmp}",
                f"dataset.num_examples={args.examples}",
                f"cycles.count={args.cycles}",
                "wandb.mode=disabled",
            ],
        )
        # the dashboard serves the state API the worker groups are counted from
        ray.init(num_cpus=args.cpus, include_dashboard=True, log_to_driver=False)
        rows: list[dict] = []
        started = time.perf_counter()
        run_trial(cfg, rows.append, trial_id="overhead")
        wall = time.perf_counter() - started
        groups = _worker_groups(cfg.resources.num_workers)
        ray.shutdown()
    per_stage = {s: sum(r.get(f"time/{s}_s", 0.0) for r in rows) for s in STAGES}
    return emit(
        "trial_overhead",
        sum(per_stage.values()),
        wall,
        target=0.6,
        better="higher",
        unit="s",
        sides=("stages' own time (workers)", "trial wall time (driver)"),
        config={
            "examples": args.examples,
            "cycles": len(rows),
            "workers": cfg.resources.num_workers,
            "worker_groups": groups,
            "stage_s": {s: round(v, 2) for s, v in per_stage.items()},
        },
        device=device_name("cpu"),
    )


def _worker_groups(workers: int) -> float:
    from ray.util.state import list_actors

    actors = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=10_000)
    return len(actors) / workers


if __name__ == "__main__":
    main()
