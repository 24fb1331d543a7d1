"""A stream of row chunks -> the fit's batches: cut to one size (`rebatched`), or drawn from
seeded shuffled windows of the stream (`shuffled`). A chunk or batch is a dict of
equal-length tensors, one per column."""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator

import torch

Rows = dict[str, torch.Tensor]


def _rows(chunk: Rows) -> int:
    return len(next(iter(chunk.values())))


def _cut(chunk: Rows, lo: int, hi: int | None = None) -> Rows:
    return {k: v[lo:hi] for k, v in chunk.items()}


def _cat(parts: list[Rows]) -> Rows:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def rebatched(chunks: Iterable[Rows], size: int) -> Iterator[Rows]:
    """Batches of `size` rows, the last one shorter if the rows run out: a batch inside one
    chunk is a view of it, one that spans two is a copy of its rows."""
    carry: list[Rows] = []
    held = 0
    for chunk in chunks:
        at, n = 0, _rows(chunk)
        if carry:
            at = min(n, size - held)
            carry.append(_cut(chunk, 0, at))
            held += at
            if held < size:
                continue
            yield _cat(carry)
            carry, held = [], 0
        while n - at >= size:
            yield _cut(chunk, at, at + size)
            at += size
        if at < n:
            carry, held = [_cut(chunk, at)], n - at
    if carry:
        yield _cat(carry)


def window_rows(rows: int, size: int) -> int:
    """A shuffle window of at least `rows` rows, in whole batches of `size` (so that only a
    stream's last batch is short)."""
    return -(-max(rows, size) // size) * size


def shuffled(windows: Iterable[Rows], size: int, seed: int) -> Iterator[Rows]:
    """Batches of `size` rows, each drawn without replacement from one window (consecutive
    windows of the stream, `rebatched` to `window_rows`), each window permuted whole and
    seeded: the same seed gives the same order, so a resumed fit replays its epoch. Each row
    is copied once, into its batch (on whatever device the windows are)."""
    g = torch.Generator().manual_seed(seed)
    for rows in windows:
        order = torch.randperm(_rows(rows), generator=g).to(next(iter(rows.values())).device)
        for at in range(0, len(order), size):
            yield {k: v.index_select(0, order[at : at + size]) for k, v in rows.items()}


def read_ahead(read: Callable[[], Iterable[Rows]], depth: int = 2) -> Iterator[Rows]:
    """`read()`'s chunks, read by a thread from now on, up to `depth` ahead of the consumer
    (pyarrow lets go of the GIL while it reads, so the read overlaps the step). An error in
    the read is raised to the consumer; a consumer that stops early, or never starts, lets
    the thread go."""
    chunks: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for chunk in read():
                if not put(chunk):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            put(err)

    def consume() -> Iterator[Rows]:
        while (item := chunks.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    threading.Thread(target=produce, name="read-ahead", daemon=True).start()
    out = consume()
    weakref.finalize(out, stop.set)  # let go once the consumer has finished with it
    return out


_END = object()
