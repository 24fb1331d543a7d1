"""The fit's feeds inside a Ray Train worker: SAE tokens/s fed from Parquet shards vs the
same loop over in-memory tensors in the same worker setup. Target >= 0.95 each.

Every side is `train_saes` (one TorchTrainer run each, same worker, same SAE, same batches
in the same order); only the feed differs:
- streamed: the fit's stream of a set too large to hold (`sae.feed: workers`,
  `feeds.streamed_feed`): the worker reads the shards itself with pyarrow's scanner;
- ray_data: the same stream through Ray Data (`sae.feed: ray_data`): `read_parquet`,
  not materialised -> Arrow batches;
- held: a set that fits in memory (`feeds.held_feed`): the worker reads its rows with
  pyarrow inside the timed run, then serves them;
- in_memory: the shard's rows loaded into a tensor before the clock starts.
Runs alternate A B C D A B C D; each side's value is its median tokens/s as the worker
measures it (from its first batch request to its last step, start-up excluded). The config
has how long each stream kept the worker waiting, before its first batch and after.

    python -m benchmarks.ray_data_feed                # 320k tokens x d 256 (328 MB), x8
    python -m benchmarks.ray_data_feed --rows 40000   # quicker
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from benchmarks.common import device_name, emit, one_pass_fit, start_ray, write_token_shards
from sae_ray.config import Resources
from sae_ray.lm.extraction import load_tokens, read_manifest
from sae_ray.sae import feeds
from sae_ray.sae.feeds import ActivationFeed, ArrayFeed, epoch_order, streamed_feed
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.shard_reads import read_columns
from sae_ray.sae.trainer import train_saes

HOOKPOINT = "h"


class TensorFeed(ActivationFeed):
    """The baseline: this worker's rows (every world-th, as Ray Data's split would give it
    an equal share) held as one tensor, sliced into the same micro-batches."""

    def __init__(self, cfg: SaeTrainConfig, world: int, device: torch.device, tokens_dir: str):
        super().__init__(cfg, world, device)
        rank = ray.train.get_context().get_world_rank()
        self.x = {
            hp: torch.from_numpy(load_tokens(Path(tokens_dir), hp))[rank::world].contiguous()
            for hp in cfg.hookpoints
        }

    def batches(self, shard, epoch: int):
        size = max(1, self.cfg.batch_size // self.world)
        rows = len(next(iter(self.x.values())))
        for start in range(0, rows, size):
            yield {hp: x[start : start + size].to(self.device) for hp, x in self.x.items()}


def timed(make, log: str):
    """A feed factory whose feeds write to `log` (JSON, as they go: the trainer stops
    mid-iteration at its budget) how long the worker waited for its first batch and for all
    the others: where a ratio's gap is."""

    def wrapped(cfg, world, device):
        feed = make(cfg, world, device)
        batches = feed.batches

        def watched(shard, epoch: int):
            state, it = {}, iter(batches(shard, epoch))
            while True:
                started = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                waited = time.perf_counter() - started
                if state:
                    state["rest"] += waited
                else:
                    state = {"first": waited, "rest": 0.0}
                Path(log).write_text(json.dumps(state))
                yield batch

        feed.batches = watched
        return feed

    return wrapped


class HeldFeed(ArrayFeed):
    """The sweep's held feed, its read inside the timed run: the rows are read (straight
    into epoch 0's order) when the first epoch's batches are asked for."""

    def __init__(self, cfg, world, device, tokens_dir: str):
        super().__init__(cfg, world, device, {}, arranged=True)
        self.tokens_dir = tokens_dir

    def batches(self, shard, epoch: int):
        if not self.columns:
            manifest = read_manifest(self.tokens_dir)
            order = None  # the fit's order: shuffled only if it shuffles
            if self.cfg.shuffle_buffer_tokens:
                order = epoch_order(manifest.rows, self.cfg.shuffle_seed, 0)
            self.columns = read_columns(
                self.tokens_dir, manifest, self.cfg.hookpoints, 0, manifest.rows, order
            )
        return super().batches(shard, epoch)


def held(tokens_dir: str):
    def make(cfg, world, device):
        return HeldFeed(cfg, world, device, tokens_dir)

    return make


def _streamed_dataset(tokens: Path):
    """Ray Data's stream of the shards, not materialised whatever their size."""
    limit, feeds.MATERIALIZE_BYTES = feeds.MATERIALIZE_BYTES, 0
    try:
        return feeds.activation_dataset(tokens, [HOOKPOINT])[0]
    finally:
        feeds.MATERIALIZE_BYTES = limit


def in_memory(tokens_dir: str):
    def make(cfg, world, device):
        return TensorFeed(cfg, world, device, tokens_dir)

    return make


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=320_000)
    parser.add_argument("--d_in", type=int, default=256)
    parser.add_argument("--expansion_factor", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--num_cpus", type=int, default=2, help="the local Ray cluster's")
    args = parser.parse_args(argv)
    start_ray(args.num_cpus, __name__)
    cfg = one_pass_fit(
        HOOKPOINT,
        args.d_in,
        args.batch,
        k=args.k,
        expansion_factor=args.expansion_factor,
        dead_tokens=args.rows // 2,
    )
    resources = Resources(num_workers=1, cpus_per_worker=1)
    sides = ("streamed", "ray_data", "held", "in_memory")
    rates: dict[str, list[float]] = {s: [] for s in sides}
    waits: dict[str, list[dict[str, float]]] = {"streamed": [], "ray_data": []}
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        write_token_shards(tokens, args.rows, args.d_in, HOOKPOINT)
        manifest, log = read_manifest(tokens), str(Path(tmp) / "waits.json")
        makers = {
            "streamed": timed(streamed_feed(str(tokens), manifest, [HOOKPOINT]), log),
            "ray_data": timed(ActivationFeed, log),
            "held": held(str(tokens)),
            "in_memory": in_memory(str(tokens)),
        }
        for rep in range(args.repeats):
            for side in sides:
                dataset = None
                if side == "ray_data":
                    dataset = _streamed_dataset(tokens)
                result = train_saes(
                    dataset,
                    args.rows,
                    cfg,
                    resources,
                    Path(tmp) / "runs",
                    train_run_name=f"{side}-{rep}",
                    feed=makers[side],
                )
                rates[side].append(result.metrics["tokens_per_s"])
                if side in waits:
                    waits[side].append(json.loads(Path(log).read_text()))
    ray.shutdown()
    rate = {side: statistics.median(r) for side, r in rates.items()}
    config = {
        "rows": args.rows,
        "d_in": args.d_in,
        "num_latents": args.d_in * args.expansion_factor,
        "k": args.k,
        "batch": args.batch,
        "repeats": args.repeats,
        "workers": 1,
        "cpus": args.num_cpus,
        "all_rates": {s: [round(r) for r in v] for s, v in rates.items()},
        # seconds the worker waited on each stream: before its first batch / after it
        "wait_first_s": {s: [round(w["first"], 2) for w in v] for s, v in waits.items()},
        "wait_rest_s": {s: [round(w["rest"], 2) for w in v] for s, v in waits.items()},
    }
    return [
        emit(
            f"{side}_feed_tokens_per_s",
            rate[side],
            rate["in_memory"],
            target=0.95,
            better="higher",
            unit="tokens/s",
            sides=(what, "in-memory tensor"),
            config=config,
            device=device_name("cpu"),
        )
        for side, what in (
            ("streamed", "streamed by the worker from the shards (pyarrow's scanner)"),
            ("ray_data", "streamed through Ray Data (read_parquet -> Arrow batches)"),
            ("held", "read by the worker (pyarrow) in the timed run, held"),
        )
    ]


if __name__ == "__main__":
    main()
