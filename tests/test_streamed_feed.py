"""A set too large to hold is streamed by each rank from the shards every epoch, with
pyarrow in its own process: exactly its rows, cut into the fit's batches, shuffled within
seeded windows when the fit shuffles."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from sae_ray.lm.extraction import ShardWriter, vectors_to_arrow
from sae_ray.sae import feeds, shard_reads
from sae_ray.sae.batching import rebatched, shuffled, window_rows
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.trainer import fit_saes


def _tokens(root, n=1000, d=8, per_shard=300, group=100):
    """Row i has i in column 0 (then noise): shards of `per_shard` rows, row groups of
    `group` (one per record batch written)."""
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x[:, 0] = np.arange(n)
    writer = ShardWriter(
        root, "tokens", d, "float32", rows_per_shard=per_shard, row_group_bytes=group * d * 4
    )
    for start in range(0, n, group):
        writer.write(pa.record_batch({"x": vectors_to_arrow(x[start : start + group])}))
    return x, writer.close()


def _ids(batches) -> np.ndarray:
    return np.concatenate([b["x"][:, 0].numpy() for b in batches]).astype(int)


@pytest.mark.parametrize("start,stop", [(0, 1000), (250, 650), (300, 600), (999, 1000), (5, 5)])
def test_a_stream_holds_exactly_its_rows_across_shards_and_row_groups(tmp_path, start, stop):
    x, manifest = _tokens(tmp_path, group=70)  # shards of 350, 350, 300 rows
    assert [f["rows"] for f in manifest.files] == [350, 350, 300]
    groups = [pq.ParquetFile(tmp_path / f["path"]).metadata.num_row_groups for f in manifest.files]
    assert groups == [5, 5, 5]  # row groups of 70 rows (and a shard's short last one)
    chunks = list(shard_reads.stream_columns(str(tmp_path), manifest, ["x"], start, stop))
    assert all(c["x"].dtype == torch.float32 and len(c["x"]) > 0 for c in chunks)
    got = torch.cat([c["x"] for c in chunks]) if chunks else torch.empty(0, 8)
    np.testing.assert_array_equal(got.numpy(), x[start:stop])


def test_rebatched_cuts_one_size_and_views_inside_a_chunk():
    chunks = [{"x": torch.arange(n * 2.0).view(n, 2) + 1000 * i} for i, n in enumerate((7, 3, 9))]
    batches = list(rebatched(chunks, 4))
    assert [len(b["x"]) for b in batches] == [4, 4, 4, 4, 3]
    torch.testing.assert_close(
        torch.cat([b["x"] for b in batches]), torch.cat([c["x"] for c in chunks])
    )
    assert batches[0]["x"].data_ptr() == chunks[0]["x"].data_ptr()  # a view, not a copy
    assert list(rebatched([], 4)) == []


def test_shuffled_draws_each_row_once_from_its_window_seeded():
    rows = {"x": torch.arange(1000.0).view(-1, 1)}
    window = window_rows(300, 64)
    assert window == 320  # whole batches: only the stream's last batch is short

    def order(seed):
        batches = list(shuffled(rebatched([rows], window), 64, seed))
        sizes = [len(b["x"]) for b in batches]
        assert sizes[:-1] == [64] * (len(sizes) - 1) and sum(sizes) == 1000
        for b in batches:  # every batch from one window
            ids = b["x"][:, 0].long()
            assert len(set((ids // window).tolist())) == 1
        return torch.cat([b["x"][:, 0] for b in batches]).long()

    first = order(3)
    assert sorted(first.tolist()) == list(range(1000))
    assert float((first.diff() == 1).float().mean()) < 0.05  # not in stored order
    assert torch.equal(first, order(3)) and not torch.equal(first, order(4))


def _cfg(**kw) -> SaeTrainConfig:
    base = dict(k=2, expansion_factor=2, batch_size=100, hookpoints=["x"], d_in=8, progress=False)
    return SaeTrainConfig(**{**base, **kw})


def test_each_epoch_streams_its_rows_again_in_a_new_seeded_order(tmp_path, monkeypatch):
    x, manifest = _tokens(tmp_path)
    monkeypatch.setattr(feeds, "MATERIALIZE_BYTES", 0)  # 32 kB: streamed, not held
    factory = feeds.worker_feed(str(tmp_path), manifest, ["x"])
    cfg = _cfg(epochs=3, shuffle_buffer_tokens=300, shuffle_seed=7)
    feed = factory(cfg, 1, "cpu")
    assert isinstance(feed, feeds.StreamFeed)
    orders = [_ids(feed.batches(None, epoch)) for epoch in range(2)]
    assert all(sorted(o) == list(range(1000)) for o in orders)
    assert not np.array_equal(orders[0], orders[1])
    np.testing.assert_array_equal(orders[0], _ids(factory(cfg, 1, "cpu").batches(None, 0)))

    passes = []
    real = shard_reads.stream_columns
    monkeypatch.setattr(feeds, "stream_columns", lambda *a: passes.append(1) or real(*a))
    fit = fit_saes(
        {"cfg": cfg.model_dump(), "rows": manifest.rows, "feed": factory}, None, None, None
    )
    assert fit.progress.step == 30 and fit.progress.tokens == 3 * 1000
    assert len(passes) == 3  # read again each epoch: nothing held


def test_two_ranks_stream_equal_contiguous_shares(tmp_path, monkeypatch):
    x, manifest = _tokens(tmp_path, n=1001)
    monkeypatch.setattr(feeds, "MATERIALIZE_BYTES", 0)
    shares = []
    for rank in range(2):
        monkeypatch.setattr(feeds, "rank_world", lambda rank=rank: (rank, 2))
        feed = feeds.worker_feed(str(tmp_path), manifest, ["x"])(_cfg(), 2, "cpu")
        batches = list(feed.batches(None, 0))
        assert [len(b["x"]) for b in batches] == [50] * 10  # batch_size / world a step
        shares.append(_ids(batches))
    np.testing.assert_array_equal(np.concatenate(shares), np.arange(1000))  # row 1000 left out


def test_a_pass_starts_reading_before_its_batches_are_asked_for():
    """The first pass's first chunk is read from the feed's construction on, and each
    next pass's as the last chunk of the one before is taken, in a thread."""
    import threading

    readers = []

    def read():
        readers.append(threading.current_thread().name)
        yield {"x": torch.arange(16.0).view(2, 8)}

    feed = feeds.StreamFeed(_cfg(batch_size=2, epochs=2), 1, "cpu", read)
    for epoch in range(2):
        assert [len(b["x"]) for b in feed.batches(None, epoch)] == [2]
    # the two epochs' reads, each begun ahead; none for a third pass the fit will not take
    assert len(readers) == 2 and all(r.startswith("read-ahead") for r in readers), readers
    resumed = feeds.StreamFeed(_cfg(batch_size=2, epochs=3), 1, "cpu", read)
    assert len(list(resumed.batches(None, 2))) == 1  # a fit resumed in its last epoch
    assert len(readers) == 3


def test_read_ahead_raises_the_reads_error_and_lets_an_abandoned_thread_go():
    import gc
    import threading

    from sae_ray.sae.batching import read_ahead

    def broken():
        yield {"x": torch.zeros(1, 2)}
        raise OSError("shard gone")

    chunks = read_ahead(broken)
    assert len(next(chunks)["x"]) == 1
    with pytest.raises(OSError, match="shard gone"):
        next(chunks)

    def endless():
        while True:
            yield {"x": torch.zeros(1, 2)}

    for started in (True, False):  # a consumer that stops early, one that never starts
        old = set(threading.enumerate())
        chunks = read_ahead(endless)
        (reader,) = set(threading.enumerate()) - old
        if started:
            next(chunks)
        del chunks
        gc.collect()
        reader.join(timeout=5)
        assert not reader.is_alive(), started
