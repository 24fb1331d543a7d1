"""A set that fits in memory is read once per fit, each rank its share, without Ray Data."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from sae_ray.lm.extraction import ShardWriter, vectors_to_arrow
from sae_ray.sae import feeds
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.trainer import fit_saes
from sae_ray.trial import sae_fit


def _tokens(root, n=1000, d=8, per_shard=300):
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    writer = ShardWriter(root, "tokens", d, "float32", rows_per_shard=per_shard)
    for start in range(0, n, 100):
        writer.write(pa.record_batch({"x": vectors_to_arrow(x[start : start + 100])}))
    return x, writer.close()


@pytest.mark.parametrize("start,stop", [(0, 1000), (250, 650), (300, 600), (999, 1000), (5, 5)])
def test_a_share_of_rows_is_read_exactly_across_shard_boundaries(tmp_path, start, stop):
    x, manifest = _tokens(tmp_path)
    assert len(manifest.files) == 4
    rows = feeds.read_rows(str(tmp_path), manifest, "x", start, stop)
    assert rows.dtype == torch.float32 and rows.shape == (stop - start, 8)
    np.testing.assert_array_equal(rows.numpy(), x[start:stop])


def test_later_epochs_read_no_parquet_and_each_rank_gets_an_equal_share(tmp_path, monkeypatch):
    x, manifest = _tokens(tmp_path)
    reads = []
    real = feeds.pq.read_table
    monkeypatch.setattr(feeds.pq, "read_table", lambda *a, **k: reads.append(1) or real(*a, **k))
    assert feeds.held(manifest)
    shard, feed = sae_fit.feed_split(str(tmp_path), manifest, "x")
    assert shard is None and len(reads) == len(manifest.files)  # every shard once, up front
    cfg = SaeTrainConfig(
        k=2, expansion_factor=2, batch_size=100, epochs=3, hookpoints=["x"], d_in=8,
        progress=False, shuffle_buffer_tokens=1,
    )  # fmt: skip
    config = {"cfg": cfg.model_dump(), "rows": manifest.rows, "feed": feed}
    fit = fit_saes(config, shard, None, None)
    assert fit.progress.step == 30 and fit.progress.tokens == 3 * 1000  # 3 epochs of 10
    assert len(reads) == len(manifest.files)  # epochs 2 and 3 read nothing

    # two ranks: equal contiguous shares, each its batch_size / world rows a step
    monkeypatch.setattr(sae_fit, "rank_world", lambda: (1, 2))
    _, second = sae_fit.feed_split(str(tmp_path), manifest, "x")
    in_order = cfg.model_copy(update={"shuffle_buffer_tokens": 0})
    batches = list(second(in_order, 2, "cpu").batches(None, 0))
    assert [len(b["x"]) for b in batches] == [50] * 10
    np.testing.assert_array_equal(torch.cat([b["x"] for b in batches]).numpy(), x[500:])
