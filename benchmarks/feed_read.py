"""The feed alone: activation rows delivered per second by the project's feeds, against
pyarrow's own read of the same Parquet shards into numpy (the ceiling) on the same CPUs.

A consumer only touches each batch (one element), so the figure is the feed's, not an
SAE's. Sides, alternated A B C A B C, the best run of each (as `timeit` takes it: the
noise here, page faults as memory changes hands between the sides, only adds time):
- pyarrow: `pq.read_table` of every shard's column, as one (rows, d) array each, its
  best (`_warm_read`); scanner: pyarrow's dataset scanner's record batches of the shards
  (`scanner_read`). The ceiling is the faster of the two;
- held: what a fit does with a set that fits in memory (`feeds.held_feed`): the rows read
  once (`shard_reads.read_rows`), then one epoch of shuffled batches (`ArrayFeed`);
- streamed: what it does with a larger set (`feeds.streamed_feed`): the shards streamed by
  pyarrow's scanner in the consuming process, cut into batches, in the stored order;
- shuffled: the same, the batches drawn from shuffled windows of `SHUFFLE_BUFFER_TOKENS`
  rows (what a sweep's fit does);
- ray_data: the stream through Ray Data instead (`feeds.activation_dataset`, not
  materialised -> `ActivationFeed.batches`: Arrow batches made tensors without a copy).

Three figures: held, streamed and shuffled, each against pyarrow (target 0.8), in rows/s;
the config has GB/s and the ray_data side.

    python -m benchmarks.feed_read                    # 320k rows x d 768 float32 (983 MB)
    python -m benchmarks.feed_read --rows 40000 --d_in 64 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from benchmarks.common import device_name, emit, start_ray, write_token_shards
from sae_ray.config import SHUFFLE_BUFFER_TOKENS
from sae_ray.lm.extraction import arrow_to_vectors, read_manifest
from sae_ray.sae import feeds
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.shard_reads import FILES_AHEAD, READ_AHEAD, READ_ROWS, read_rows

HOOKPOINT = "h"


def pyarrow_read(tokens: Path) -> int:
    """The ceiling: each shard's column read into one (rows, d) array, let go before the
    next is read. On this VM its time is set by page faults: 0.55-0.6 s for these 983 MB
    into memory Arrow's allocator already holds, up to 5 s into fresh pages (a process's
    first read, or after the Ray Data and torch sides churned memory): `_warm_read`."""
    manifest, rows = read_manifest(tokens), 0
    for path in manifest.paths(tokens):
        x = arrow_to_vectors(pq.read_table(path, columns=[HOOKPOINT])[HOOKPOINT], manifest.d)
        float(x[0, 0])
        rows += len(x)
        del x
    return rows


def scanner_read(tokens: Path) -> int:
    """pyarrow's other read: its dataset scanner's record batches of every shard (read
    ahead as the fit's stream reads them), each touched."""
    manifest, rows = read_manifest(tokens), 0
    dataset = ds.dataset(manifest.paths(tokens), format="parquet")
    for b in dataset.to_batches(
        columns=[HOOKPOINT],
        batch_size=READ_ROWS,
        batch_readahead=READ_AHEAD,
        fragment_readahead=FILES_AHEAD,
    ):
        x = arrow_to_vectors(b.column(0), manifest.d)
        float(x[0, 0])
        rows += len(x)
    return rows


def _warm_read(tokens: Path) -> tuple[int, float]:
    """pyarrow's best: its read timed right after an untimed one, into the pages its
    allocator kept (the first read into fresh pages is the VM's page faults)."""
    pyarrow_read(tokens)
    return _timed(lambda: pyarrow_read(tokens))


def _timed(fn) -> tuple[int, float]:
    started = time.perf_counter()
    rows = fn()
    return rows, time.perf_counter() - started


def held(tokens: Path, batch: int) -> int:
    manifest = read_manifest(tokens)
    columns = {HOOKPOINT: read_rows(str(tokens), manifest, HOOKPOINT, 0, manifest.rows)}
    cfg = SaeTrainConfig(
        hookpoints=[HOOKPOINT], d_in=manifest.d, batch_size=batch, shuffle_buffer_tokens=1
    )
    rows = 0
    for b in feeds.ArrayFeed(cfg, 1, torch.device("cpu"), columns).batches(None, 0):
        x = b[HOOKPOINT]
        float(x[0, 0])
        rows += len(x)
    return rows


def _stream(tokens: Path):
    limit, feeds.MATERIALIZE_BYTES = feeds.MATERIALIZE_BYTES, 0  # stream, whatever its size
    try:
        return feeds.activation_dataset(tokens, [HOOKPOINT])[0]
    finally:
        feeds.MATERIALIZE_BYTES = limit


def _touch(batches) -> int:
    rows = 0
    for b in batches:
        x = b[HOOKPOINT]
        float(x[0, 0])
        rows += len(x)
    return rows


def _config(tokens: Path, batch: int, shuffle: int = 0) -> SaeTrainConfig:
    d = read_manifest(tokens).d
    return SaeTrainConfig(
        hookpoints=[HOOKPOINT], d_in=d, batch_size=batch, shuffle_buffer_tokens=shuffle
    )


def streamed(tokens: Path, batch: int, shuffle: int = 0) -> int:
    make = feeds.streamed_feed(str(tokens), read_manifest(tokens), [HOOKPOINT])
    feed = make(_config(tokens, batch, shuffle), 1, torch.device("cpu"))
    return _touch(feed.batches(None, 0))


def ray_data(tokens: Path, batch: int) -> int:
    feed = feeds.ActivationFeed(_config(tokens, batch), 1, torch.device("cpu"))
    return _touch(feed.batches(_stream(tokens), 0))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=320_000)
    parser.add_argument("--d_in", type=int, default=768)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num_cpus", type=int, default=2, help="the local Ray cluster's")
    args = parser.parse_args(argv)
    start_ray(args.num_cpus, __name__)
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        write_token_shards(tokens, args.rows, args.d_in, HOOKPOINT)
        sides = {  # each: (rows, seconds)
            "pyarrow": lambda: _warm_read(tokens),
            "scanner": lambda: _timed(lambda: scanner_read(tokens)),
            "held": lambda: _timed(lambda: held(tokens, args.batch)),
            "streamed": lambda: _timed(lambda: streamed(tokens, args.batch)),
            "shuffled": lambda: _timed(lambda: streamed(tokens, args.batch, SHUFFLE_BUFFER_TOKENS)),
            "ray_data": lambda: _timed(lambda: ray_data(tokens, args.batch)),
        }
        for side, fn in sides.items():  # warm the page cache and Ray Data's workers
            assert fn()[0] == args.rows, side
            times[side] = []
        for _ in range(args.repeats):
            for side, fn in sides.items():
                times[side].append(fn()[1])
    rate = {s: args.rows / min(t) for s, t in times.items()}
    ceiling = max(rate["pyarrow"], rate["scanner"])  # pyarrow's faster read, as measured
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
        ("streamed", "the fit's stream: pyarrow's scanner in the consumer, cut into batches"),
        ("shuffled", f"the same, batches from shuffled {SHUFFLE_BUFFER_TOKENS}-row windows"),
    ):
        out.append(
            emit(
                f"feed_{side}_rows_per_s",
                rate[side],
                ceiling,
                target=0.8,
                better="higher",
                unit="rows/s",
                sides=(what, "pyarrow's faster read of the same shards: read_table or scanner"),
                config=config,
                device=device_name("cpu"),
            )
        )
    return out


if __name__ == "__main__":
    main()
