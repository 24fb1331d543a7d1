"""Many SAEs on one stream: 8 SAEs (k x expansion factor) co-trained in one `train_saes` run
against the same 8 fitted one after another, each its own run. Target: wall-time ratio
<= 0.3.

Both sides read the same activation shards through Ray Data (`activation_dataset`, the
trainer's path) with the same batches, steps and seeds; each co-trained SAE is the solo
fit's SAE bit for bit (tests/test_cotrain.py). The co-trained run pays once for what every
fit pays: the worker group's start, the stream's read and conversion, the checkpoints. The
line also reports the SAE training time the workers measured on each side (`compute_s`:
the solo sides' sum), which shows what the shared stream saves inside the workers alone.

    python -m benchmarks.multi_sae                    # 100k tokens x d 128, 8 SAEs
    python -m benchmarks.multi_sae --rows 20000       # quicker
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import ray

from benchmarks.common import device_name, emit, one_pass_fit, start_ray, write_token_shards
from sae_ray.config import Resources
from sae_ray.sae.feeds import activation_dataset
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.trainer import train_saes

HOOKPOINT = "h"


def _fit(tokens: Path, cfg: SaeTrainConfig, storage: Path, name: str) -> tuple[float, float]:
    """One `train_saes` run: its wall time (dataset to result) and the workers' own time."""
    start = time.perf_counter()
    dataset, rows = activation_dataset(tokens, [HOOKPOINT])
    result = train_saes(dataset, rows, cfg, Resources(num_workers=1), storage, train_run_name=name)
    wall = time.perf_counter() - start
    return wall, result.metrics["tokens"] / result.metrics["tokens_per_s"]


def _cfg(args, **settings) -> SaeTrainConfig:
    return one_pass_fit(HOOKPOINT, args.d_in, args.batch, **settings)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--d_in", type=int, default=128)
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--expansion_factor", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--num_cpus", type=int, default=2, help="the local Ray cluster's")
    args = parser.parse_args(argv)
    start_ray(args.num_cpus)
    grid = [
        {"k": k, "expansion_factor": e} for k, e in itertools.product(args.k, args.expansion_factor)
    ]
    base = dict(dead_tokens=args.rows // 2)
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        write_token_shards(tokens, args.rows, args.d_in, HOOKPOINT)
        storage = Path(tmp) / "runs"
        together, together_compute = _fit(
            tokens, _cfg(args, **base, **grid[0], variants=grid), storage, "together"
        )
        solo = [
            _fit(tokens, _cfg(args, **base, **g), storage, f"solo-{i}") for i, g in enumerate(grid)
        ]
    ray.shutdown()
    return emit(
        "multi_sae_wall_s",
        together,
        sum(wall for wall, _ in solo),
        target=0.3,
        better="lower",
        unit="s",
        sides=(f"{len(grid)} SAEs co-trained on one stream", f"{len(grid)} fits one by one"),
        config={
            "rows": args.rows,
            "d_in": args.d_in,
            "saes": [f"k{g['k']}-x{g['expansion_factor']}" for g in grid],
            "batch": args.batch,
            "workers": 1,
            "cpus": args.num_cpus,
            "compute_s": {
                "together": round(together_compute, 2),
                "one_by_one": round(sum(c for _, c in solo), 2),
            },
            "solo_wall_s": [round(w, 1) for w, _ in solo],
        },
        device=device_name("cpu"),
    )


if __name__ == "__main__":
    main()
