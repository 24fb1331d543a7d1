"""Stored activations -> SAE batches: the token shards as a Ray Dataset (`activation_dataset`)
and the feed a Train worker draws its batches and losses from (`ActivationFeed`). The
end-to-end feed, through a frozen model, is `spliced.ModelFeed`."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import ray
import torch

from sae_ray.distributed.ranks import all_reduce, rank_world
from sae_ray.lm.extraction import Manifest, column_of, read_manifest
from sae_ray.sae.batching import read_ahead, rebatched, shuffled, window_rows
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.sae.shard_reads import read_columns, stream_columns, tensor_of
from sae_ray.sae.training import sae_loss

MATERIALIZE_BYTES = 256 << 20  # activation sets up to this size are read once, then reused
BLOCK_BYTES = 16 << 20  # Ray Data blocks of the activation feed
PREFETCH_BATCHES = 4  # batches Ray Data prepares ahead of the step (its default: 1)


class ActivationFeed:
    """Stored activations -> each SAE on its hookpoint's column (the local losses)."""

    def __init__(self, cfg: SaeTrainConfig, world: int, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.members = cfg.members()

    def batches(self, shard, epoch: int):
        """This worker's batches of its Ray Data shard (`sae.feed: ray_data`), as Arrow
        tables made tensors here without a copy (`arrow_to_vectors`): Ray Data's own torch
        and numpy formats convert a vector column element by element."""
        cfg = self.cfg
        tables = shard.iter_batches(
            batch_size=max(1, cfg.batch_size // self.world),
            batch_format="pyarrow",
            prefetch_batches=PREFETCH_BATCHES,
            local_shuffle_buffer_size=cfg.shuffle_buffer_tokens or None,
            local_shuffle_seed=cfg.shuffle_seed + epoch if cfg.shuffle_buffer_tokens else None,
        )
        for table in tables:
            yield {
                name: tensor_of(table[name], cfg.width(name)).to(self.device, torch.float32)
                for name in table.column_names
            }

    def column(self, key: str) -> str:
        """The column the SAE `key` reads."""
        return self.members[key].source()

    def target(self, key: str, batch) -> torch.Tensor | None:
        """What a transcoder predicts (its module's output); None: its own input."""
        member = self.members[key]
        return batch[member.target()] if member.transcode else None

    def init_b_dec(self, saes: dict[str, SparseAutoencoder], batch) -> None:
        for key, sae in saes.items():
            sae.init_b_dec(batch[self.column(key)], self.target(key, batch))

    def norm_scales(self, batch) -> dict[str, float]:
        """Each hookpoint's scale to E‖x‖ = √d (SAELens's rule), from this batch on every
        rank (their mean norm, all-reduced: one scale for all)."""
        out = {}
        for column in self.cfg.columns():
            x = batch[column].float()
            norms = all_reduce(torch.stack([x.norm(dim=-1).sum(), x.new_tensor(len(x))]))
            out[column] = math.sqrt(x.shape[-1]) / float(norms[0] / norms[1])
        return out

    def scaled(self, batch, scales: dict[str, float]):
        return {**batch, **{column: batch[column] * s for column, s in scales.items()}}

    def losses(self, models, saes, batch, trackers) -> tuple[torch.Tensor, dict[str, dict]]:
        """Every SAE's loss on its hookpoint's column of the one batch. Their parameters are
        disjoint, so one backward of the sum gives each SAE the gradient of its own loss."""
        total, stats = 0.0, {}
        for key, sae in saes.items():
            loss, stats[key] = sae_loss(
                models[key],
                sae,
                batch[self.column(key)],
                trackers[key],
                self.members[key].auxk_alpha,
                self.world,
                self.cfg.loss_fn,
                self.target(key, batch),
            )
            total = total + loss
        return total, stats


class ArrayFeed(ActivationFeed):
    """Rows held in memory (one tensor per hookpoint: this rank's share, or all of them for
    a fit without Ray): the stream in order, or each epoch's rows permuted whole (seeded:
    `epoch_order`) when the fit shuffles.

    `arranged`: the columns are held in epoch 0's order already (`read_columns` wrote them
    there as it read), so epoch 0's batches are slices (views) and no copy is gathered."""

    def __init__(
        self,
        cfg: SaeTrainConfig,
        world: int,
        device,
        columns: dict[str, torch.Tensor],
        arranged: bool = False,
    ):
        super().__init__(cfg, world, device)
        self.columns, self.arranged = columns, arranged and bool(cfg.shuffle_buffer_tokens)
        self._where: torch.Tensor | None = None

    def batches(self, shard, epoch: int):
        cfg = self.cfg
        rows = len(next(iter(self.columns.values())))
        order = None  # in order: each batch a slice (a view), not a gathered copy
        if cfg.shuffle_buffer_tokens and not (self.arranged and epoch == 0):
            order = epoch_order(rows, cfg.shuffle_seed, epoch)
            if self.arranged:  # held[i] is row order₀[i]: row j is at where₀[j]
                if self._where is None:
                    self._where = torch.argsort(epoch_order(rows, cfg.shuffle_seed, 0))
                order = self._where[order]
        size = max(1, cfg.batch_size // self.world)
        for start in range(0, rows, size):
            pick = slice(start, start + size)
            if order is not None:
                pick = order[pick]
            # the stored dtype crosses the bus (half the bytes for float16), then float32
            yield {
                hp: x[pick].to(self.device, non_blocking=True).float()
                for hp, x in self.columns.items()
            }


def epoch_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The order a shuffled fit visits `rows` held rows in, in `epoch`."""
    return torch.randperm(rows, generator=torch.Generator().manual_seed(seed + epoch))


def held_feed(tokens_dir: str, manifest: Manifest, columns: list[str]):
    """The feed factory (`trainer.fit_saes`'s `feed`) of a set that fits in memory: each rank
    reads its contiguous equal share of `columns` once, straight into its first epoch's
    order when the fit shuffles, and holds it (`ArrayFeed`)."""

    def make(cfg: SaeTrainConfig, world: int, device: torch.device) -> ArrayFeed:
        rank = rank_world()[0]
        per = manifest.rows // world
        first = epoch_order(per, cfg.shuffle_seed, 0) if cfg.shuffle_buffer_tokens else None
        rows = read_columns(tokens_dir, manifest, columns, rank * per, (rank + 1) * per, first)
        return ArrayFeed(cfg, world, device, placed(rows, device), arranged=first is not None)

    return make


def placed(rows: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Where a GPU fit holds its rows: on the GPU when they take under a quarter of its free
    memory (each epoch's gathers run there; nothing crosses the bus again), else in pinned
    host memory (a batch's copy to the GPU then overlaps the step). A CPU fit: as read."""
    device = torch.device(device)
    if device.type != "cuda":
        return rows
    free, _ = torch.cuda.mem_get_info(device)
    if sum(x.nbytes for x in rows.values()) < free // 4:
        return {c: x.to(device) for c, x in rows.items()}
    return {c: x.pin_memory() for c, x in rows.items()}


class StreamFeed(ActivationFeed):
    """This rank's rows streamed from the shards by this process each epoch (`read`, a
    fresh `shard_reads.stream_columns` per pass), cut into the fit's batches, drawn from
    seeded shuffled windows of `shuffle_buffer_tokens` rows when the fit shuffles
    (`batching.shuffled`): a set too large to hold."""

    def __init__(self, cfg: SaeTrainConfig, world: int, device, read):
        super().__init__(cfg, world, device)
        self.read = read
        self._next: Iterator | None = read_ahead(read)  # the first pass reads from now on

    def _pass(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch's chunks, read ahead of the step in a thread; as its last is taken, the
        next epoch's read begins, if the fit has one (its epochs; a token budget may end it
        anywhere)."""
        chunks, self._next = self._next, None
        yield from chunks if chunks is not None else read_ahead(self.read)
        if self.cfg.max_tokens is not None or epoch + 1 < self.cfg.epochs:
            self._next = read_ahead(self.read)

    def batches(self, shard, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.cfg
        size = max(1, cfg.batch_size // self.world)
        if not cfg.shuffle_buffer_tokens:
            return map(self._on_device, rebatched(self._pass(epoch), size))
        # Each window goes to the device whole and is permuted there: a CPU's one copy of
        # every row (the gather) is a GPU's to make where one trains.
        windows = rebatched(self._pass(epoch), window_rows(cfg.shuffle_buffer_tokens, size))
        return shuffled(map(self._on_device, windows), size, cfg.shuffle_seed + epoch)

    def _on_device(self, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {c: x.to(self.device).float() for c, x in rows.items()}


def streamed_feed(tokens_dir: str, manifest: Manifest, columns: list[str]):
    """The feed factory of a set too large to hold: each rank streams its contiguous equal
    share of `columns` every epoch (`StreamFeed`)."""

    def make(cfg: SaeTrainConfig, world: int, device: torch.device) -> StreamFeed:
        rank = rank_world()[0]
        per = manifest.rows // world
        lo, hi = rank * per, (rank + 1) * per
        return StreamFeed(
            cfg, world, device, lambda: stream_columns(tokens_dir, manifest, columns, lo, hi)
        )

    return make


def fit_data(tokens_dir: str | Path, columns: list[str], feed: str):
    """What a fit on the stored activations under `tokens_dir` reads, by `sae.feed`:
    (None, the workers' own feed factory, rows) or (a Ray Dataset, None, rows)."""
    if feed == "ray_data":
        dataset, rows = activation_dataset(tokens_dir, columns)
        return dataset, None, rows
    manifest = read_manifest(tokens_dir, verify=True)
    return None, worker_feed(str(tokens_dir), manifest, columns), manifest.rows


def worker_feed(tokens_dir: str, manifest: Manifest, columns: list[str]):
    """The feed factory of a fit on stored activations, read by its workers themselves:
    held when the set fits in memory (`held`), streamed every epoch when it does not."""
    make = held_feed if held(manifest, columns) else streamed_feed
    return make(tokens_dir, manifest, columns)


def held(manifest: Manifest, columns: int | list[str] = 1) -> bool:
    """Whether a fit holds these activations in memory (read once, each rank its share)
    rather than streaming them through Ray Data every epoch."""
    return _bytes(manifest, columns) <= MATERIALIZE_BYTES


def _bytes(manifest: Manifest, columns: int | list[str]) -> int:
    """What `columns` (a count of width d, or named columns) of the table weigh."""
    named = [manifest.d] * columns if isinstance(columns, int) else map(manifest.width, columns)
    return manifest.rows * sum(named) * np.dtype(manifest.dtype).itemsize


def quiet_ordered_data() -> None:
    context = ray.data.DataContext.get_current()
    # Per-operator progress bars from every worker drown the sweep's own output.
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True  # same blocks in the same order each run


def activation_dataset(
    tokens_dir: Path | str, hookpoints: list[str]
) -> tuple[ray.data.Dataset, int]:
    """The token shards under `tokens_dir` (a path, or a bucket URI that every node can read)
    as a Ray Dataset of the hookpoints' columns, and the number of token rows (checked against
    the manifest first).

    Read with Ray Data's file-based Parquet datasource (V1), in blocks of about
    `BLOCK_BYTES`: Ray 2.60's default (V2) lists the files in a remote task first, which put
    2-4 s before every epoch's first batch here, and a block per shard (100 MB) left the reads
    nothing to overlap with (`benchmarks/ray_data_feed.py` measures both)."""
    manifest = read_manifest(tokens_dir, verify=True)
    for hp in hookpoints:
        column_of(manifest, tokens_dir, hp)
    quiet_ordered_data()
    nbytes = _bytes(manifest, hookpoints)
    context = ray.data.DataContext.get_current()
    v2, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        dataset = ray.data.read_parquet(
            manifest.paths(tokens_dir),
            columns=hookpoints,
            override_num_blocks=max(len(manifest.files), -(-nbytes // BLOCK_BYTES)),
        )
    finally:
        context.use_datasource_v2 = v2
    if nbytes <= MATERIALIZE_BYTES:
        # Each lazy pass re-plans and re-reads (seconds even on MBs): read small sets once.
        dataset = dataset.materialize()
    return dataset, manifest.rows
