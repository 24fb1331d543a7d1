"""Scale: one trial of a GPT-2-small-shaped model (12 blocks, width 768, random weights
from a config: no download) on the synthetic task at n and 4n examples, SAE x16. Each
stage's time should grow linearly with the data (4n / n <= 4.4) and the peak memory of
the trial's driver and of its Train workers should not grow with it (<= 1.2): nothing
held whole is O(n x latents) (sparse codes, streamed SAE quality, streamed shards).

Each size runs in a fresh process on a fresh local Ray cluster (a process's peak is its
high-water mark); the stages' times are the `time/*_s` each cycle reports (rank 0's clock),
the workers' peak the `memory/worker_peak_mb` they report, the driver's its own.

    python -m benchmarks.scale                       # n = 200: about 10 minutes on 2 CPUs
    python -m benchmarks.scale --examples 100 --model tiny-gpt2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import device_name, emit, peak_rss_mb

QUICKSTART = Path(__file__).parents[1] / "sweeps" / "quickstart.yaml"
STAGES = {"model": "fine-tune", "activations": "extraction", "sae": "SAE fit", "evaluate": "eval"}


def one_trial(examples: int, model: str, cpus: int) -> dict:
    """This process runs one trial and returns its stage times and peaks."""
    import ray

    from sae_ray import config as C
    from sae_ray.trial.driver import run_trial

    with tempfile.TemporaryDirectory() as tmp:
        cfg = C.load(
            QUICKSTART,
            [
                f"experiment.storage_path={tmp}",
                f"model.name={model}",
                f"dataset.num_examples={examples}",
                "cycles.count=1",
                "cycles.epochs=1",
                "sae.expansion_factor=16",
                "sae.epochs=1",
                "wandb.mode=disabled",
            ],
        )
        ray.init(num_cpus=cpus, log_to_driver=False)
        rows: list[dict] = []
        started = time.perf_counter()
        run_trial(cfg, rows.append, trial_id="scale")
        wall = time.perf_counter() - started
        ray.shutdown()
    (row,) = rows
    return {
        "stages": {s: row[f"time/{s}_s"] for s in STAGES},
        "worker_peak_mb": row["memory/worker_peak_mb"],
        "driver_peak_mb": peak_rss_mb(),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="n: the small size")
    parser.add_argument("--model", default="random-gpt2")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's size
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_trial(args.one, args.model, args.cpus)))
        return []
    runs = {}
    for n in (args.examples, 4 * args.examples):
        cmd = [sys.executable, "-m", "benchmarks.scale", "--one", str(n)]
        cmd += ["--model", args.model, "--cpus", str(args.cpus)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[n] = json.loads(done.stdout.strip().splitlines()[-1])
    small, large = runs[args.examples], runs[4 * args.examples]
    config = {"model": args.model, "examples": [args.examples, 4 * args.examples]}
    config |= {
        "stage_s": {
            n: {STAGES[s]: round(t, 2) for s, t in r["stages"].items()} for n, r in runs.items()
        }
    }
    device = device_name("cpu")
    lines = [
        emit(
            f"scale_{s}_time_4x",
            large["stages"][s],
            small["stages"][s],
            4.4,
            "lower",
            config,
            device,
            "s",
            ("4n", "n"),
        )
        for s in STAGES
    ]
    for who in ("driver", "worker"):
        key = f"{who}_peak_mb"
        lines.append(
            emit(
                f"scale_{who}_peak_4x",
                large[key],
                small[key],
                1.2,
                "lower",
                config,
                device,
                "MB",
                ("4n", "n"),
            )
        )
    return lines


if __name__ == "__main__":
    main()
