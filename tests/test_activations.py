import numpy as np
import pyarrow.parquet as pq
import pytest

from sae_ray.lm.extraction import (
    ShardWriter,
    extract,
    load_sequences,
    load_tokens,
    read_manifest,
    vectors_to_arrow,
)
from sae_ray.lm.models import build_classifier


def test_shards_round_trip_exactly(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 24)).astype(np.float32)
    writer = ShardWriter(tmp_path, "tokens", 24, "float32", rows_per_shard=300)
    for start in range(0, 1000, 128):
        chunk = x[start : start + 128]
        writer.write(
            pa.record_batch(
                {
                    "example_id": pa.array(np.arange(start, start + len(chunk))),
                    "x": vectors_to_arrow(chunk),
                }
            )
        )
    manifest = writer.close()
    assert manifest.rows == 1000 and len(manifest.files) == 3  # a shard closes past 300 rows
    assert sum(f["rows"] for f in manifest.files) == 1000
    np.testing.assert_array_equal(load_tokens(tmp_path), x)  # bit-exact
    read_manifest(tmp_path, verify=True)


def test_a_sliced_or_chunked_column_gives_its_own_rows():
    """What the feed's Arrow batches are made of: slices of blocks, several chunks."""
    import pyarrow as pa

    from sae_ray.lm.extraction import arrow_to_vectors
    from sae_ray.sae.shard_reads import tensor_of

    for dtype in ("float32", "float16"):
        x = np.arange(40, dtype=dtype).reshape(10, 4)
        old = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4)  # shards before
        for column in (vectors_to_arrow(x), old):
            got = arrow_to_vectors(column.slice(3, 2), 4)
            assert got.dtype == dtype
            np.testing.assert_array_equal(got, x[3:5])
            chunked = pa.chunked_array([column.slice(7, 3), column.slice(0, 1)])
            np.testing.assert_array_equal(arrow_to_vectors(chunked, 4), x[[7, 8, 9, 0]])
            empty = arrow_to_vectors(pa.chunked_array([], type=column.type), 4)
            assert empty.shape == (0, 4) and empty.dtype == dtype
            assert tensor_of(pa.chunked_array([column.slice(2, 3)]), 4).tolist() == x[2:5].tolist()


def test_corrupted_shard_is_refused(tmp_path):
    import pyarrow as pa

    writer = ShardWriter(tmp_path, "tokens", 4, "float32")
    writer.write(pa.record_batch({"x": vectors_to_arrow(np.ones((10, 4), np.float32))}))
    manifest = writer.close()
    shard = tmp_path / manifest.files[0]["path"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ValueError, match="checksum"):
        read_manifest(tmp_path, verify=True)


def test_extract_writes_every_non_pad_token(tmp_path, topics):
    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, seed=0, max_length=32)
    split = topics.splits["validation"]
    manifests = extract(clf, split, -1, tmp_path, max_length=32, batch_size=7)
    n_tokens = sum(
        len(clf.tokenizer(t, truncation=True, max_length=32)["input_ids"]) for t in split.texts
    )
    assert manifests["tokens"].rows == n_tokens
    ids, labels, x = load_sequences(tmp_path / "sequences")
    np.testing.assert_array_equal(ids, split.ids)
    np.testing.assert_array_equal(labels, split.labels)
    assert x.shape == (len(split), 64)
    token_ids = pq.read_table(read_manifest(tmp_path / "tokens").paths(tmp_path / "tokens"))
    assert set(token_ids["example_id"].to_pylist()) == set(split.ids.tolist())


def test_a_models_small_batches_gather_into_large_row_groups(tmp_path):
    """A reader's record batch is at most one row group: extraction's batch-sized writes
    (a few thousand rows) are gathered into row groups of about 16 MB."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    writer = ShardWriter(tmp_path, "tokens", 16, "float32", rows_per_shard=1200)
    for start in range(0, 2000, 100):
        writer.write(pa.record_batch({"x": vectors_to_arrow(x[start : start + 100])}))
    manifest = writer.close()
    assert [f["rows"] for f in manifest.files] == [1200, 800]
    for f in manifest.files:
        assert pq.ParquetFile(tmp_path / f["path"]).metadata.num_row_groups == 1
    np.testing.assert_array_equal(load_tokens(tmp_path), x)
