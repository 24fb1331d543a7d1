"""Ray Data feed: SAE tokens/s fed from Parquet shards through Ray Data into a Ray Train
worker vs the same loop over in-memory tensors in the same worker setup. Target >= 0.95.
A second figure does the same for the held feed (what a sweep's fit uses for a set that
fits in memory: the worker reads its rows with pyarrow, inside the timed run).

Both sides are `train_saes` (one TorchTrainer run each, same worker, same SAE, same batches
in the same order); only the feed differs: Ray Data's streaming `read_parquet` ->
`iter_torch_batches` (the sweep's path: the set is larger than what `activation_dataset`
materialises, so it streams), or the shard's rows loaded into a tensor before the clock
starts. Runs alternate A B A B; each side's value is its median tokens/s as the worker
measures it (from its first batch request to its last step, start-up excluded).

    python -m benchmarks.ray_data_feed                # 320k tokens x d 256 (328 MB), x8
    python -m benchmarks.ray_data_feed --rows 40000   # quicker (then it is materialised)
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
from sae_ray.sae.feeds import (
    MATERIALIZE_BYTES,
    ActivationFeed,
    ArrayFeed,
    activation_dataset,
    epoch_order,
    read_columns,
)
from sae_ray.sae.fit_config import SaeTrainConfig
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


class WatchedFeed(ActivationFeed):
    """Ray Data's feed as the trainer uses it, calling `watch(seconds waited)` as each batch
    arrives and writing `state` to `log` as JSON (as it goes: the trainer stops mid-iteration
    at its budget)."""

    def __init__(self, cfg, world, device, log: str):
        super().__init__(cfg, world, device)
        self.log, self.state = log, {}

    def watch(self, waited: float) -> None:
        raise NotImplementedError

    def batches(self, shard, epoch: int):
        it = iter(super().batches(shard, epoch))
        while True:
            started = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.watch(time.perf_counter() - started)
            Path(self.log).write_text(json.dumps(self.state))
            yield batch

    @classmethod
    def factory(cls, log: str):
        """What `train_saes(feed=...)` takes: built on each worker."""

        def make(cfg, world, device):
            return cls(cfg, world, device, log)

        return make


class TimedFeed(WatchedFeed):
    """How long the worker waited for its first batch and for all the others: where the
    ratio's gap is."""

    def watch(self, waited: float) -> None:
        if "first" not in self.state:
            self.state = {"first": waited, "rest": 0.0}
        else:
            self.state["rest"] += waited


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
    rates: dict[str, list[float]] = {"ray_data": [], "held": [], "in_memory": []}
    waits: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens"
        write_token_shards(tokens, args.rows, args.d_in, HOOKPOINT)
        for rep in range(args.repeats):
            for side in rates:
                if side == "ray_data":
                    dataset, rows = activation_dataset(tokens, [HOOKPOINT])
                    result = train_saes(
                        dataset,
                        rows,
                        cfg,
                        resources,
                        Path(tmp) / "runs",
                        train_run_name=f"data-{rep}",
                        feed=TimedFeed.factory(str(Path(tmp) / "waits.json")),
                    )
                else:
                    result = train_saes(
                        None,
                        args.rows,
                        cfg,
                        resources,
                        Path(tmp) / "runs",
                        train_run_name=f"{side}-{rep}",
                        feed=(held if side == "held" else in_memory)(str(tokens)),
                    )
                rates[side].append(result.metrics["tokens_per_s"])
                if side == "ray_data":
                    waits.append(json.loads((Path(tmp) / "waits.json").read_text()))
    ray.shutdown()
    data, kept, memory = (statistics.median(rates[s]) for s in ("ray_data", "held", "in_memory"))
    config = {
        "rows": args.rows,
        "d_in": args.d_in,
        "num_latents": args.d_in * args.expansion_factor,
        "k": args.k,
        "batch": args.batch,
        "repeats": args.repeats,
        "streamed": args.rows * args.d_in * 4 > MATERIALIZE_BYTES,
        "workers": 1,
        "cpus": args.num_cpus,
        "all_rates": {s: [round(r) for r in v] for s, v in rates.items()},
        # seconds the worker waited on Ray Data: before its first batch / after it
        "ray_data_wait_first_s": [round(w["first"], 2) for w in waits],
        "ray_data_wait_rest_s": [round(w["rest"], 2) for w in waits],
    }
    return [
        emit(
            name,
            ours,
            memory,
            target=0.95,
            better="higher",
            unit="tokens/s",
            sides=(what, "in-memory tensor"),
            config=config,
            device=device_name("cpu"),
        )
        for name, ours, what in (
            ("ray_data_feed_tokens_per_s", data, "Ray Data read_parquet -> iter_torch_batches"),
            ("held_feed_tokens_per_s", kept, "read by the worker (pyarrow), held, shuffled"),
        )
    ]


if __name__ == "__main__":
    main()
