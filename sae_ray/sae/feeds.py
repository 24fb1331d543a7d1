"""Stored activations -> SAE batches: the token shards as a Ray Dataset (`activation_dataset`)
and the feed a Train worker draws its batches and losses from (`ActivationFeed`). The
end-to-end feed, through a frozen model, is `spliced.ModelFeed`."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from sae_ray import storage
from sae_ray.distributed.ranks import all_reduce, rank_world
from sae_ray.lm.extraction import Manifest, arrow_to_vectors, column_of, read_manifest
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.sae.training import sae_loss

MATERIALIZE_BYTES = 256 << 20  # activation sets up to this size are read once, then reused
BLOCK_BYTES = 16 << 20  # Ray Data blocks of the activation feed
PREFETCH_BATCHES = 4  # batches Ray Data prepares ahead of the step (its default: 1)


def tensor_of(column, d: int) -> torch.Tensor:
    """An Arrow fixed-size-list column as an (n, d) tensor in its stored dtype, sharing
    Arrow's read-only memory where it is one chunk (the feed only reads it)."""
    rows = arrow_to_vectors(column, d)
    with warnings.catch_warnings():  # read-only Arrow memory, only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


class ActivationFeed:
    """Stored activations -> each SAE on its hookpoint's column (the local losses)."""

    def __init__(self, cfg: SaeTrainConfig, world: int, device: torch.device):
        self.cfg, self.world, self.device = cfg, world, device
        self.members = cfg.members()

    def batches(self, shard, epoch: int):
        """This worker's batches of its shard, as Arrow tables made tensors here without a
        copy (`arrow_to_vectors`): Ray Data's own torch and numpy formats convert a
        fixed-size-list column at about half the rate (`benchmarks/feed_read.py`)."""
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
            yield {hp: x[pick].float().to(self.device) for hp, x in self.columns.items()}


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
        return ArrayFeed(cfg, world, device, rows, arranged=first is not None)

    return make


def held(manifest: Manifest, columns: int | list[str] = 1) -> bool:
    """Whether a fit holds these activations in memory (read once, each rank its share)
    rather than streaming them through Ray Data every epoch."""
    return _bytes(manifest, columns) <= MATERIALIZE_BYTES


def _bytes(manifest: Manifest, columns: int | list[str]) -> int:
    """What `columns` (a count of width d, or named columns) of the table weigh."""
    named = [manifest.d] * columns if isinstance(columns, int) else map(manifest.width, columns)
    return manifest.rows * sum(named) * np.dtype(manifest.dtype).itemsize


def read_rows(
    tokens_dir: str,
    manifest: Manifest,
    column: str,
    start: int,
    stop: int,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows [start, stop) of one vector column (`read_columns`)."""
    return read_columns(tokens_dir, manifest, [column], start, stop, order)[column]


def read_columns(
    tokens_dir: str,
    manifest: Manifest,
    columns: list[str],
    start: int,
    stop: int,
    order: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Rows [start, stop) of vector columns, a tensor each (the stored dtype), read with
    pyarrow in this process from only the shards that hold them, each shard once; with
    `order` (a permutation of the range) row `order[i]` of the range is written at i.

    No Ray task is involved: a rank reads its share with the CPU it already holds, so a fit
    never waits for a free CPU that a cluster which lost a node may not have. Each record
    batch is copied once, straight to where it goes."""
    dtype = getattr(torch, np.dtype(manifest.dtype).name)
    out = {c: torch.empty(max(0, stop - start), manifest.width(c), dtype=dtype) for c in columns}
    where = None if order is None else torch.argsort(order)
    first = 0
    for entry in manifest.files:
        last = first + entry["rows"]
        if last > start and first < stop:
            fs, path = storage.filesystem(storage.join(tokens_dir, entry["path"]))
            with fs.open_input_file(path) as f:
                table = pq.read_table(f, columns=columns)
            for column in columns:
                _place(table[column].chunks, out[column], first, start, stop, where)
        first = last
    return out


def _place(chunks, out: torch.Tensor, first: int, start: int, stop: int, where) -> None:
    """Copy the chunks' rows (rows `first`.. of the table) that fall in [start, stop) to
    their places in `out`: in order, or at `where[row - start]`."""
    d = out.shape[1]
    for chunk in chunks:
        lo, hi = max(start, first), min(stop, first + len(chunk))
        if lo < hi:
            rows = chunk.flatten().to_numpy().reshape(-1, d)
            with warnings.catch_warnings():  # read-only Arrow memory, only read
                warnings.simplefilter("ignore", UserWarning)
                part = torch.from_numpy(rows[lo - first : hi - first])
            if where is None:
                out[lo - start : hi - start] = part
            else:
                out.index_copy_(0, where[lo - start : hi - start], part)
        first += len(chunk)


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
