"""Rows of the token shards read by the process that trains on them, with pyarrow: a range
held whole (`read_columns`) or streamed in order (`stream_columns`). No Ray task is
involved: a rank reads its share with the CPU it already holds, so a fit never waits for a
free CPU that a cluster which lost a node may not have, and no block passes through the
object store (Ray Data's hop for a stream that needs no transform: a ninth of the rate
here, `benchmarks/feed_read.py`)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import torch

from sae_ray import storage
from sae_ray.lm.extraction import Manifest, arrow_to_vectors

# Rows per record batch of a stream (at most a row group): pyarrow's per-batch cost put
# 4096-row batches at a third of the rate of 65,536-row ones.
READ_ROWS = 65_536
READ_AHEAD = 4  # record batches pyarrow's threads decode ahead of the consumer
FILES_AHEAD = 1  # shards opened ahead: each more holds its batches in flight too


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
    rows (a tensor per column, viewing Arrow's memory). Only the row groups holding the range
    are read, by pyarrow's scanner, which decodes `READ_AHEAD` batches ahead in its own
    threads (the feed iterates it in `batching.read_ahead`'s thread: the step never waits
    on a read). ParquetFile.iter_batches in that thread took less CPU but read at a third
    of the rate, and a step waited on it."""
    fragments, fmt, fs, pos = [], ds.ParquetFileFormat(), None, None
    for entry, first in _spans(manifest, start, stop):
        fs, path = storage.filesystem(storage.join(tokens_dir, entry["path"]))
        groups = pq.ParquetFile(path, filesystem=fs).metadata
        picked = []
        for g in range(groups.num_row_groups):
            n = groups.row_group(g).num_rows
            if first + n > start and first < stop:
                picked.append(g)
                pos = first if pos is None else pos
            first += n
        fragments.append(fmt.make_fragment(path, fs, row_groups=picked))
    if not fragments:
        return
    dataset = ds.FileSystemDataset(fragments, fragments[0].physical_schema, fmt, fs)
    for batch in dataset.to_batches(
        columns=columns,
        batch_size=READ_ROWS,
        batch_readahead=READ_AHEAD,
        fragment_readahead=FILES_AHEAD,
    ):
        lo, hi = max(start, pos) - pos, min(stop, pos + batch.num_rows) - pos
        pos += batch.num_rows
        if lo < hi:
            yield {c: tensor_of(batch.column(c), manifest.width(c))[lo:hi] for c in columns}
