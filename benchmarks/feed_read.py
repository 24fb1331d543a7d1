"""The feed alone: activation rows delivered per second by the project's feeds, against
pyarrow's own read of the same Parquet shards into numpy (the ceiling) on the same CPUs.

A consumer only touches each batch (one element), so the figure is the feed's, not an
SAE's. Sides, alternated A B C A B C, median of each:
- pyarrow: `pq.read_table` of every shard's column, as one (rows, d) array each;
- held: what a sweep's SAE fit does with a set that fits in memory (`sae/feeds.held`): the
  rows read once by `feeds.read_rows`, then one epoch of shuffled batches (`ArrayFeed`);
- streamed: what it does with a larger set: Ray Data's `read_parquet` ->
  `iter_torch_batches` (`feeds.activation_dataset`, not materialised), in the driver.

Two figures: held / pyarrow and streamed / pyarrow (target 0.8 each), in rows/s; the
config has GB/s.

    python -m benchmarks.feed_read                    # 320k rows x d 768 float32 (983 MB)
    python -m benchmarks.feed_read --rows 40000 --d_in 64 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from benchmarks.common import device_name, emit, start_ray, write_token_shards
from sae_ray.lm.extraction import arrow_to_vectors, read_manifest
from sae_ray.sae import feeds
from sae_ray.sae.fit_config import SaeTrainConfig

HOOKPOINT = "h"


def pyarrow_read(tokens: Path) -> int:
    manifest, rows = read_manifest(tokens), 0
    for path in manifest.paths(tokens):
        x = arrow_to_vectors(pq.read_table(path, columns=[HOOKPOINT])[HOOKPOINT], manifest.d)
        rows += len(x)
    return rows


def held(tokens: Path, batch: int) -> int:
    manifest = read_manifest(tokens)
    columns = {HOOKPOINT: feeds.read_rows(str(tokens), manifest, HOOKPOINT, 0, manifest.rows)}
    cfg = SaeTrainConfig(
        hookpoints=[HOOKPOINT], d_in=manifest.d, batch_size=batch, shuffle_buffer_tokens=1
    )
    rows = 0
    for b in feeds.ArrayFeed(cfg, 1, torch.device("cpu"), columns).batches(None, 0):
        x = b[HOOKPOINT]
        float(x[0, 0])
        rows += len(x)
    return rows


def streamed(tokens: Path, batch: int) -> int:
    limit, feeds.MATERIALIZE_BYTES = feeds.MATERIALIZE_BYTES, 0  # stream, whatever its size
    try:
        dataset, _ = feeds.activation_dataset(tokens, [HOOKPOINT])
    finally:
        feeds.MATERIALIZE_BYTES = limit
    rows = 0
    for b in dataset.iter_torch_batches(batch_size=batch, dtypes=torch.float32):
        x = b[HOOKPOINT]
        float(x[0, 0])
        rows += len(x)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=320_000)
    parser.add_argument("--d_in", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_cpus", type=int, default=2, help="the local Ray cluster's")
    args = parser.parse_args(argv)
    start_ray(args.num_cpus, __name__)
    times: dict[str, list[float]] = {"pyarrow": [], "held": [], "streamed": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        write_token_shards(tokens, args.rows, args.d_in, HOOKPOINT)
        sides = {
            "pyarrow": lambda: pyarrow_read(tokens),
            "held": lambda: held(tokens, args.batch),
            "streamed": lambda: streamed(tokens, args.batch),
        }
        for side, fn in sides.items():  # warm the page cache and Ray Data's workers
            assert fn() == args.rows, side
        for _ in range(args.repeats):
            for side, fn in sides.items():
                started = time.perf_counter()
                fn()
                times[side].append(time.perf_counter() - started)
    rate = {s: args.rows / statistics.median(t) for s, t in times.items()}
    gbps = {s: round(r * args.d_in * 4 / 1e9, 3) for s, r in rate.items()}
    config = {
        "rows": args.rows,
        "d_in": args.d_in,
        "bytes": args.rows * args.d_in * 4,
        "batch": args.batch,
        "repeats": args.repeats,
        "cpus": args.num_cpus,
        "gb_per_s": gbps,
        "all_seconds": {s: [round(x, 3) for x in t] for s, t in times.items()},
    }
    out = []
    for side, what in (
        ("held", "read once by the fit's workers (pyarrow), shuffled batches"),
        ("streamed", "Ray Data read_parquet -> iter_torch_batches"),
    ):
        out.append(
            emit(
                f"feed_{side}_rows_per_s",
                rate[side],
                rate["pyarrow"],
                target=0.8,
                better="higher",
                unit="rows/s",
                sides=(what, "pyarrow read_table of the same shards"),
                config=config,
                device=device_name("cpu"),
            )
        )
    return out


if __name__ == "__main__":
    main()
