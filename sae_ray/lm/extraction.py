"""Frozen model -> hooked activations as Parquet shards of Arrow record batches.

Two tables per split: token rows (every non-pad token; what the SAE trains on) and
sequence rows (the pooled position, with example id and label; what sharpening and
evaluation read). A manifest records rows, width, dtype and a checksum per shard so a
reader can refuse a truncated or foreign shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from sae_ray import storage
from sae_ray.lm.batching import batches
from sae_ray.lm.hookpoints import hooked_points
from sae_ray.lm.models import Classifier, hookpoint, pooled
from sae_ray.lm.text_data import Split

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    kind: str  # "tokens" or "sequences"
    d: int
    dtype: str
    rows: int = 0
    files: list[dict] = field(default_factory=list)
    columns: list[str] = field(default_factory=lambda: ["x"])  # vector columns, each (rows, d)
    widths: dict[str, int] = field(default_factory=dict)  # a column's width, where not d

    def width(self, column: str) -> int:
        return self.widths.get(column, self.d)

    def paths(self, root: Path | str) -> list[str]:
        """The shards as paths or URIs, whichever `root` is (Ray Data reads both)."""
        return [storage.join(str(root), f["path"]) for f in self.files]


def vectors_to_arrow(x: np.ndarray) -> pa.FixedSizeBinaryArray:
    """(n, d) -> a column of each row's bytes (fixed-size binary; the manifest keeps the
    dtype), without a copy of a C-contiguous array. Parquet stores a fixed-size list with a
    repetition and a definition level per element: reading one back ran at a fifth of the
    rate of the same bytes stored whole per row."""
    x = np.ascontiguousarray(x)
    kind = pa.binary(x.shape[1] * x.itemsize)
    return pa.FixedSizeBinaryArray.from_buffers(kind, len(x), [None, pa.py_buffer(x)])


def arrow_to_vectors(column: pa.ChunkedArray | pa.Array, d: int) -> np.ndarray:
    """A vector column (`vectors_to_arrow`'s, or a fixed-size list of floats, as shards
    stored before it) -> (n, d), without a copy where it is one chunk (then read-only:
    Arrow's memory). A sliced chunk is read from its offset."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    parts = [_chunk_rows(c, d) for c in chunks]
    if len(parts) == 1:
        return parts[0]
    if not parts:
        return np.empty((0, d), dtype=_float_of(column.type, d))
    return np.concatenate(parts)


def _float_of(kind: pa.DataType, d: int) -> np.dtype:
    if pa.types.is_fixed_size_binary(kind):
        return np.dtype(f"<f{kind.byte_width // d}")
    return np.dtype(kind.value_type.to_pandas_dtype())


def _chunk_rows(chunk: pa.Array, d: int) -> np.ndarray:
    if not pa.types.is_fixed_size_binary(chunk.type):  # `flatten` respects the offset
        return chunk.flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
    width = chunk.type.byte_width
    data = chunk.buffers()[1]
    rows = np.frombuffer(data, _float_of(chunk.type, d), len(chunk) * d, chunk.offset * width)
    return rows.reshape(-1, d)


# Bytes of rows gathered into one Parquet row group. A model's batch of tokens (a few
# thousand rows) made a row group each; a reader's record batch is at most one row group,
# and an SAE batch that spans two is a copy (`sae/shard_reads.py`, `sae/batching.py`).
# Larger groups make a stream's first batch wait longer (0.4-0.9 s for 64 MB, cold).
ROW_GROUP_BYTES = 16 << 20


class ShardWriter:
    """Streams record batches into fixed-size Parquet shards, in row groups of about
    `row_group_bytes`; nothing is held whole."""

    def __init__(
        self,
        root: Path,
        kind: str,
        d: int,
        dtype: str,
        rows_per_shard: int = 200_000,
        columns: list[str] | None = None,
        prefix: str = "",
        widths: dict[str, int] | None = None,
        row_group_bytes: int = ROW_GROUP_BYTES,
    ):
        self.root, self.rows_per_shard, self.prefix = root, rows_per_shard, prefix
        self.row_group_bytes = row_group_bytes
        self._pending: list[pa.RecordBatch] = []  # the row group being gathered
        self.manifest = Manifest(
            kind=kind,
            d=d,
            dtype=dtype,
            columns=columns or ["x"],
            widths={c: w for c, w in (widths or {}).items() if w != d},
        )
        self._writer: pq.ParquetWriter | None = None
        self._rows_in_shard = 0
        root.mkdir(parents=True, exist_ok=True)

    def write(self, batch: pa.RecordBatch) -> None:
        if self._writer is None:
            name = f"{self.manifest.kind}-{self.prefix}{len(self.manifest.files):05d}.parquet"
            # Dictionary-encode the id columns only: tried on float vectors, the encoding
            # was 80% of the write time and its fallback made the file 40% larger.
            ids = [f.name for f in batch.schema if f.name not in self.manifest.columns]
            self._writer = pq.ParquetWriter(self.root / name, batch.schema, use_dictionary=ids)
            self.manifest.files.append({"path": name, "rows": 0})
        self._pending.append(batch)
        if sum(b.nbytes for b in self._pending) >= self.row_group_bytes:
            self._flush()
        self._rows_in_shard += batch.num_rows
        self.manifest.files[-1]["rows"] += batch.num_rows
        self.manifest.rows += batch.num_rows
        if self._rows_in_shard >= self.rows_per_shard:
            self._close_shard()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending))  # one row group
            self._pending = []

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._flush()
            self._writer.close()
            entry = self.manifest.files[-1]
            entry["sha256"] = storage.sha256(self.root / entry["path"])
            entry["bytes"] = (self.root / entry["path"]).stat().st_size
            self._writer, self._rows_in_shard = None, 0

    def close(self, write: bool = True) -> Manifest:
        self._close_shard()
        if write:
            write_manifest(self.root, self.manifest)
        return self.manifest


def write_manifest(root: Path, manifest: Manifest) -> None:
    (root / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1))


def merge_manifests(parts: list[Manifest]) -> Manifest:
    """One table from the parts several ranks wrote, in rank order (the rows' order when a
    single process extracts the same examples)."""
    first = parts[0]
    merged = Manifest(
        kind=first.kind, d=first.d, dtype=first.dtype, columns=first.columns, widths=first.widths
    )
    for part in parts:
        merged.files.extend(part.files)
        merged.rows += part.rows
    return merged


def read_manifest(root: Path | str, verify: bool = False) -> Manifest:
    """A table's manifest, from a local directory or a bucket URI.

    `verify` re-hashes local shards. Shards in a bucket are checked by size only: the
    object store checksums its own transfers, and hashing would mean a second full read."""
    path = storage.join(str(root), MANIFEST)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{path}: no activation manifest")
    manifest = Manifest(**json.loads(storage.read_bytes(path)))
    if verify:
        for entry in manifest.files:
            shard = storage.join(str(root), entry["path"])
            if storage.is_remote(shard):
                ok = entry.get("bytes") in (None, storage.size(shard))
            else:
                ok = storage.sha256(Path(shard)) == entry["sha256"]
            if not ok:
                raise ValueError(f"{shard}: checksum does not match the manifest")
    return manifest


def column_of(manifest: Manifest, root: Path, column: str | None) -> str:
    """The vector column to read: the one asked for, or the table's only one."""
    if column is None:
        if len(manifest.columns) != 1:
            raise ValueError(f"{root}: several hookpoints {manifest.columns}; name one")
        return manifest.columns[0]
    if column not in manifest.columns:
        raise ValueError(f"{root}: no hookpoint {column!r} (has {manifest.columns})")
    return column


def _check_finite(rows: dict[str, torch.Tensor], ids: torch.Tensor) -> None:
    for name, r in rows.items():
        if not torch.isfinite(r).all():
            bad = ~torch.isfinite(r).all(dim=-1)
            raise FloatingPointError(
                f"{name}: activations are NaN or Inf for {int(bad.sum())} tokens of "
                f"examples {sorted(set(ids.tolist()))[:3]}...: the model is broken"
            )


def _check_range(rows: dict[str, torch.Tensor], dtype: np.dtype) -> None:
    """Half-precision storage must hold the values: refuse, never store an Inf."""
    if dtype != np.float16:
        return
    for name, r in rows.items():
        peak = float(r.abs().max()) if r.numel() else 0.0
        if peak > float(np.finfo(np.float16).max):
            raise FloatingPointError(
                f"{name}: activations reach {peak:.4g}, past float16's 65504: store them as "
                "float32 (sae.activation_dtype, train-sae's --activation_dtype)"
            )


@torch.no_grad()
def extract(
    clf: Classifier,
    split: Split,
    layers: int | list[int] | list[str],
    out_dir: Path,
    max_length: int,
    batch_size: int = 64,
    dtype: str = "float32",
    tokens: bool = True,
    max_tokens: int | None = None,
    order: np.ndarray | None = None,
    part: int | None = None,
    exclude: list[int] | None = None,
) -> dict[str, Manifest]:
    """Write `out_dir/tokens` (optional) and `out_dir/sequences` for one split.

    Every layer in `layers` (a block's index, or any hookpoint: `hookpoints.matching`) is
    captured from the same forward pass and stored as its own column, named by its
    hookpoint: training SAEs on many layers costs one extraction.
    `max_tokens` stops once that many token rows are written (the SAE's budget). `order`
    picks the examples (one rank's slice) and `part` names that rank's shards, whose
    manifests are returned, not written: the ranks' parts are merged by `merge_manifests`.
    Token ids in `exclude` are left out of the token rows (the pooled rows keep them).
    """
    clf.model.eval()
    device = next(clf.model.parameters()).device
    layers = [layers] if isinstance(layers, int) else list(layers)
    points = list(
        dict.fromkeys(p if isinstance(p, str) else hookpoint(clf.model, p) for p in layers)
    )
    trunk = clf.model.base_model if clf.is_lm else clf.model  # an LM's logits: never needed
    np_dtype = np.dtype(dtype)
    writers: dict[str, ShardWriter] = {}
    written = 0
    for batch in batches(clf, split, batch_size, max_length, order):
        with hooked_points(clf.model, points) as store:
            trunk(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            )
        mask = batch["attention_mask"]
        keep = token_rows(batch, exclude)
        hidden = {name: store[name].float().cpu() for name in points}
        rows = {name: h[keep] for name, h in hidden.items()}  # every kept token
        _check_finite(rows, batch["ids"])
        _check_range(rows, np_dtype)
        if not writers:
            writers = _writers(out_dir, hidden, dtype, tokens, part)
        seq = {
            name: vectors_to_arrow(
                pooled(h, mask, clf.pooling).numpy().astype(np_dtype, copy=False)
            )
            for name, h in hidden.items()
        }
        writers["sequences"].write(
            pa.record_batch(
                {
                    "example_id": pa.array(batch["ids"].numpy()),
                    "label": pa.array(batch["labels"].numpy()),
                    **seq,
                }
            )
        )
        if tokens:
            example = batch["ids"].unsqueeze(1).expand_as(mask)[keep].numpy()
            take = len(example) if max_tokens is None else min(len(example), max_tokens - written)
            tok = {
                n: vectors_to_arrow(r[:take].numpy().astype(np_dtype, copy=False))
                for n, r in rows.items()
            }
            ids = {"example_id": example[:take], "token_id": batch["input_ids"][keep][:take]}
            ids = {k: pa.array(np.asarray(v)) for k, v in ids.items()}  # token_id: absorption's
            writers["tokens"].write(pa.record_batch({**ids, **tok}))
            written += take
            if max_tokens is not None and written >= max_tokens:
                break
    return {kind: w.close(write=part is None) for kind, w in writers.items()}


def _writers(
    out_dir: Path, hidden: dict[str, torch.Tensor], dtype: str, tokens: bool, part: int | None
) -> dict[str, ShardWriter]:
    """The tables' writers, each column as wide as its hookpoint's activations."""
    widths = {name: h.shape[-1] for name, h in hidden.items()}
    columns = list(hidden)
    kinds = ("tokens", "sequences") if tokens else ("sequences",)
    prefix = "" if part is None else f"r{part:03d}-"
    return {
        k: ShardWriter(
            out_dir / k, k, widths[columns[0]], dtype, columns=columns, prefix=prefix, widths=widths
        )
        for k in kinds
    }


def token_rows(batch: dict[str, torch.Tensor], exclude: list[int] | None) -> torch.Tensor:
    """Which positions are token rows: real tokens (not padding) not in `exclude`."""
    keep = batch["attention_mask"].bool()
    if exclude:
        keep &= ~torch.isin(batch["input_ids"], torch.as_tensor(exclude))
    return keep


def load_sequences(
    root: Path, column: str | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(example_ids, labels, x) of a sequence table, read whole: it is one row per example."""
    manifest = read_manifest(root)
    column = column_of(manifest, root, column)
    table = pq.read_table(manifest.paths(root), columns=["example_id", "label", column])
    return (
        table["example_id"].to_numpy(),
        table["label"].to_numpy(),
        arrow_to_vectors(table[column], manifest.width(column)).astype(np.float32),
    )


def iter_tokens(root: Path, column: str | None = None) -> Iterator[np.ndarray]:
    """A token table's rows, one record batch at a time (float32): a pass over held-out
    tokens without holding them all."""
    manifest = read_manifest(root)
    column = column_of(manifest, root, column)
    for path in manifest.paths(root):
        for rb in pq.ParquetFile(path).iter_batches(columns=[column]):
            yield arrow_to_vectors(rb.column(0), manifest.width(column)).astype(np.float32)


def load_token_ids(root: Path, limit: int) -> np.ndarray:
    """The vocabulary ids of a token table's first `limit` rows (iter_tokens' order)."""
    manifest = read_manifest(root)
    table = pq.read_table(manifest.paths(root), columns=["token_id"]).slice(0, limit)
    return table.column(0).to_numpy()


def load_tokens(root: Path, column: str | None = None, limit: int | None = None) -> np.ndarray:
    parts, total = [], 0
    for part in iter_tokens(root, column):
        parts.append(part)
        total += len(part)
        if limit and total >= limit:
            return np.concatenate(parts)[:limit]
    return np.concatenate(parts)
