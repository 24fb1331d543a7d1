"""Sweep sharing: wall time of an 8-trial x 2-cycle sweep with shared artifacts vs the same
sweep with `experiment.share_artifacts: false` (every trial computes every stage). Target
<= 0.4 (shared / unshared seconds).

Each side is `sae-ray sweep benchmarks/sweep_sharing.yaml` in its own process (its own local
Ray cluster) and its own storage directory; `config` also counts the artifacts each side
computed, read from its artifact store, and says where each side's time went: the seconds
its trials' cycles spent in each stage (`time/<stage>_s` of results.csv, summed over trials
and cycles; a shared stage's wait or load counts where it happens) and the rest of the wall
time (Ray's start, each trial's and its worker group's start, reporting). Two sweeps of ~8
trials: tens of minutes on 2 CPUs.

    python -m benchmarks.sweep_sharing
    python -m benchmarks.sweep_sharing --examples 4800                 # 4x the work per stage
    python -m benchmarks.sweep_sharing --sweep sweeps/quickstart.yaml   # another sweep
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import device_name, emit
from sae_ray.storage.artifacts import DONE

HERE = Path(__file__).parent
KINDS = ("model", "activations", "sae", "targets", "evaluation")


def computed(store: Path) -> dict[str, int]:
    """Artifacts in a store (each unshared trial's store counted in)."""
    return {kind: len(list(store.glob(f"**/{kind}-*/{DONE}"))) for kind in KINDS}


def stage_seconds(results: Path, wall_s: float) -> dict[str, float]:
    """Seconds in each stage over all trials and cycles, and what the stages leave of the
    wall time."""
    import pandas as pd

    table = pd.read_csv(results)
    stages = {c.split("/")[1][:-2]: float(table[c].sum()) for c in table if c.startswith("time/")}
    stages["outside_stages"] = wall_s - sum(stages.values())
    return {k: round(v, 1) for k, v in stages.items()}


def run_side(
    sweep: Path, storage: Path, shared: bool, overrides: list[str]
) -> tuple[float, dict[str, int], dict]:
    cmd = [
        sys.executable,
        "-m",
        "sae_ray",
        "sweep",
        str(sweep),
        f"experiment.storage_path={storage}",
        f"experiment.share_artifacts={str(shared).lower()}",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local cluster
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    (name,) = [p for p in storage.iterdir() if p.is_dir()]
    return seconds, computed(name / "artifacts"), stage_seconds(name / "results.csv", seconds)


def _work(stages: dict[str, float]) -> float:
    return sum(v for k, v in stages.items() if k != "outside_stages")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=HERE / "sweep_sharing.yaml")
    parser.add_argument(
        "--examples", type=int, default=None, help="dataset.num_examples (the YAML's: 1200)"
    )
    args = parser.parse_args(argv)
    extra = [f"dataset.num_examples={args.examples}"] if args.examples else []
    with tempfile.TemporaryDirectory() as tmp:
        shared_s, shared_n, shared_t = run_side(args.sweep, Path(tmp) / "shared", True, extra)
        alone_s, alone_n, alone_t = run_side(args.sweep, Path(tmp) / "unshared", False, extra)
    return emit(
        "sweep_sharing_wall_s",
        shared_s,
        alone_s,
        target=0.4,
        better="lower",
        unit="s",
        sides=("artifacts shared", "every trial computes its own"),
        config={
            "sweep": str(args.sweep),
            "overrides": extra,
            # the work sharing saves, without what every trial pays alike (Ray's start,
            # each trial's worker group): the ratio a sweep of longer stages tends to
            "stage_ratio": round(_work(shared_t) / max(_work(alone_t), 1e-9), 3),
            # the ratio if sharing left the shared side no stage work at all: what both sides
            # pay alike bounds the wall ratio from below at this size
            "ratio_if_stages_were_free": round(shared_t["outside_stages"] / alone_s, 3),
            "computed_shared": shared_n,
            "computed_unshared": alone_n,
            "stage_s_shared": shared_t,
            "stage_s_unshared": alone_t,
        },
        device=device_name("cpu"),
    )


if __name__ == "__main__":
    main()
