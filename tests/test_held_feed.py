"""A set that fits in memory is read once per fit, each rank its share, without Ray Data."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from sae_ray.lm.extraction import ShardWriter, vectors_to_arrow
from sae_ray.sae import feeds, shard_reads
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
    rows = shard_reads.read_rows(str(tmp_path), manifest, "x", start, stop)
    assert rows.dtype == torch.float32 and rows.shape == (stop - start, 8)
    np.testing.assert_array_equal(rows.numpy(), x[start:stop])


def test_later_epochs_read_no_parquet_and_each_rank_gets_an_equal_share(tmp_path, monkeypatch):
    x, manifest = _tokens(tmp_path)
    reads = []
    real = shard_reads.pq.read_table
    counted = lambda *a, **k: reads.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(shard_reads.pq, "read_table", counted)
    assert feeds.held(manifest)
    cfg = SaeTrainConfig(
        k=2, expansion_factor=2, batch_size=100, epochs=3, hookpoints=["x"], d_in=8,
        progress=False, shuffle_buffer_tokens=1, shuffle_seed=7,
    )  # fmt: skip
    shard, factory = sae_fit.feed_split(str(tmp_path), manifest, "x", "workers")
    assert shard is None and reads == []  # read by each rank's fit, in its own process
    feed = factory(cfg, 1, "cpu")  # what a rank's fit does first
    assert len(reads) == len(manifest.files)  # every shard once, up front
    # read straight into epoch 0's order: the batches a permutation of the rows held in order
    plain = feeds.ArrayFeed(cfg, 1, "cpu", {"x": torch.from_numpy(x)})
    for epoch in range(3):
        pairs = zip(feed.batches(None, epoch), plain.batches(None, epoch), strict=True)
        assert all(torch.equal(a["x"], b["x"]) for a, b in pairs), epoch
    config = {"cfg": cfg.model_dump(), "rows": manifest.rows, "feed": factory}
    fit = fit_saes(config, shard, None, None)
    assert fit.progress.step == 30 and fit.progress.tokens == 3 * 1000  # 3 epochs of 10
    assert len(reads) == 2 * len(manifest.files)  # the fit's own read; epochs 2, 3 nothing

    # two ranks: equal contiguous shares, each its batch_size / world rows a step
    monkeypatch.setattr(feeds, "rank_world", lambda: (1, 2))
    _, second = sae_fit.feed_split(str(tmp_path), manifest, "x", "workers")
    in_order = cfg.model_copy(update={"shuffle_buffer_tokens": 0})
    batches = list(second(in_order, 2, "cpu").batches(None, 0))
    assert [len(b["x"]) for b in batches] == [50] * 10
    np.testing.assert_array_equal(torch.cat([b["x"] for b in batches]).numpy(), x[500:])


def test_half_precision_storage_halves_the_bytes_and_keeps_the_fvu(tmp_path):
    """Activations kept in float16 (what `activation_dtype: auto` stores for a bfloat16
    model): half the bytes on disk and in memory, and an SAE fitted on them reconstructs
    held-out float32 rows within 0.005 FVU of one fitted on the float32 rows."""
    from sae_ray.sae.model import fvu
    from sae_ray.sae.trainer import fit_in_process

    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(96, 32, generator=gen) * 4
    codes = torch.rand(12000, 96, generator=gen) * (torch.rand(12000, 96, generator=gen) < 0.06)
    x = (codes @ basis + 3).numpy()
    fits, sizes = {}, {}
    for dtype in ("float32", "float16"):
        writer = ShardWriter(tmp_path / dtype, "tokens", 32, dtype, rows_per_shard=4000)
        for start in range(0, 10000, 1000):
            rows = x[start : start + 1000].astype(dtype)
            writer.write(pa.record_batch({"x": vectors_to_arrow(rows)}))
        manifest = writer.close()
        sizes[dtype] = sum(f["bytes"] for f in manifest.files)
        held = shard_reads.read_rows(str(tmp_path / dtype), manifest, "x", 0, manifest.rows)
        assert held.dtype == getattr(torch, dtype)
        cfg = SaeTrainConfig(
            k=8, expansion_factor=4, batch_size=500, epochs=4, hookpoints=["x"], d_in=32,
            progress=False, shuffle_buffer_tokens=1,
        )  # fmt: skip
        sae = fit_in_process({"x": held}, cfg).saes["x"].eval()
        test = torch.from_numpy(x[10000:])
        with torch.no_grad():
            fits[dtype] = float(fvu(test, sae(test)[0]))
    assert sizes["float16"] < 0.6 * sizes["float32"], sizes
    assert abs(fits["float16"] - fits["float32"]) < 0.005, fits


def test_auto_stores_half_precision_for_a_half_precision_model_and_refuses_overflow():
    from sae_ray.config.sae import stored_activation_dtype
    from sae_ray.lm.extraction import _check_range

    assert stored_activation_dtype("auto", "torch.bfloat16") == "float16"
    assert stored_activation_dtype("auto", "float32") == "float32"
    assert stored_activation_dtype("float32", "bfloat16") == "float32"  # asked for: kept
    _check_range({"h": torch.full((2, 3), 6e4)}, np.dtype("float16"))
    with pytest.raises(FloatingPointError, match="past float16's 65504.*activation_dtype"):
        _check_range({"h": torch.full((2, 3), 7e4)}, np.dtype("float16"))
    _check_range({"h": torch.full((2, 3), 7e4)}, np.dtype("float32"))


def test_a_cpu_fit_holds_its_rows_as_read():
    rows = {"x": torch.ones(4, 2)}
    assert feeds.placed(rows, "cpu")["x"] is rows["x"]  # no copy, no pinning
