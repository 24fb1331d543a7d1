"""Rows of the token shards read by the process that trains on them, with pyarrow: a range
held whole (`read_columns`) or streamed in order (`stream_columns`). No Ray task is
involved: a rank reads its share with the CPU it already holds, so a fit never waits for a
free CPU that a cluster which lost a node may not have, and no block passes through the
object store (Ray Data's hop for a stream that needs no transform, at about half the rate:
`benchmarks/feed_read.py`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch

from sae_ray import storage
from sae_ray.lm.extraction import Manifest, arrow_to_vectors

# Rows per record batch of a stream (at most a row group): pyarrow's per-batch cost put
# 4096-row batches at a third of the rate of 65,536-row ones.
READ_ROWS = 65_536


def tensor_of(column, d: int) -> torch.Tensor:
    """A stored vector column as an (n, d) tensor in its stored dtype, sharing Arrow's
    read-only memory where it is one chunk (the feed only reads it)."""
    rows = arrow_to_vectors(column, d)
    with warnings.catch_warnings():  # read-only Arrow memory, only read
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rows)


def _spans(manifest: Manifest, start: int, stop: int) -> Iterator[tuple[dict, int]]:
    """(shard entry, its first row) of each shard holding rows of [start, stop)."""
    first = 0
    for entry in manifest.files:
        last = first + entry["rows"]
        if last > start and first < stop:
            yield entry, first
        first = last


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
    """Rows [start, stop) of vector columns, a tensor each (the stored dtype), read from only
    the shards that hold them, each shard once; with `order` (a permutation of the range)
    row `order[i]` of the range is written at i. Each record batch is copied once, straight
    to where it goes."""
    dtype = getattr(torch, np.dtype(manifest.dtype).name)
    out = {c: torch.empty(max(0, stop - start), manifest.width(c), dtype=dtype) for c in columns}
    where = None if order is None else torch.argsort(order)
    for entry, first in _spans(manifest, start, stop):
        fs, path = storage.filesystem(storage.join(tokens_dir, entry["path"]))
        with fs.open_input_file(path) as f:
            table = pq.read_table(f, columns=columns)
        for column in columns:
            _place(table[column].chunks, out[column], first, start, stop, where)
    return out


def _place(chunks, out: torch.Tensor, first: int, start: int, stop: int, where) -> None:
    """Copy the chunks' rows (rows `first`.. of the table) that fall in [start, stop) to
    their places in `out`: in order, or at `where[row - start]`."""
    d = out.shape[1]
    for chunk in chunks:
        lo, hi = max(start, first), min(stop, first + len(chunk))
        if lo < hi:
            part = tensor_of(chunk, d)[lo - first : hi - first]
            if where is None:
                out[lo - start : hi - start] = part
            else:
                out.index_copy_(0, where[lo - start : hi - start], part)
        first += len(chunk)


def stream_columns(
    tokens_dir: str, manifest: Manifest, columns: list[str], start: int, stop: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Rows [start, stop) of vector columns in stored order, as chunks of up to `READ_ROWS`
    rows (a tensor per column, viewing Arrow's memory), reading only the row groups that
    hold them. Read where it is iterated (`batching.read_ahead` runs it in a thread, ahead of
    the step): pyarrow's dataset scanner, decoding ahead in its own pool, took 2-10x the
    CPU for it on 2 cores."""
    for entry, first in _spans(manifest, start, stop):
        fs, path = storage.filesystem(storage.join(tokens_dir, entry["path"]))
        with fs.open_input_file(path) as f:
            parquet = pq.ParquetFile(f)
            groups, at = [], None
            for g in range(parquet.metadata.num_row_groups):
                n = parquet.metadata.row_group(g).num_rows
                if first + n > start and first < stop:
                    groups.append(g)
                    at = first if at is None else at
                first += n
            for batch in parquet.iter_batches(READ_ROWS, row_groups=groups, columns=columns):
                lo, hi = max(start, at) - at, min(stop, at + batch.num_rows) - at
                at += batch.num_rows
                if lo < hi:
                    yield {c: tensor_of(batch.column(c), manifest.width(c))[lo:hi] for c in columns}
