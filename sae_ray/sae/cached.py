"""SAEs on activations from elsewhere (what SAELens users call cached activations): `.npy`
arrays of rows, Parquet files with one or more vector columns, or a token table this
package wrote (a sweep's `activations-*/train/tokens`, `train-sae`'s cache).

Everything becomes the store's token table (Parquet shards with a manifest, one column
per hookpoint) once, cached by what the files are, so every fit reads one format through
the same feeds, trainer, checkpoints and metrics as the rest of sae-ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from sae_ray.config import ConfigError, Resources, Sae, one_line
from sae_ray.lm.extraction import (
    MANIFEST,
    Manifest,
    ShardWriter,
    load_tokens,
    read_manifest,
    vectors_to_arrow,
)
from sae_ray.lm.hookpoints import INPUT
from sae_ray.lm.hookpoints import source as source_column
from sae_ray.storage.artifacts import ArtifactStore

SUFFIXES = (".npy", ".parquet")


def _files(source: Path) -> list[Path]:
    files = sorted(source.glob("*")) if source.is_dir() else [source]
    files = [f for f in files if f.suffix in SUFFIXES]
    kinds = {f.suffix for f in files}
    if not files or len(kinds) > 1:
        found = "both .npy and .parquet files" if files else "no .npy or .parquet file"
        raise ConfigError(f"--activations: {source} has {found}")
    return files


def table_of(source: str | Path, cache: str | Path, column: str = "x") -> Path:
    """The token table of `source` (a directory with a manifest), written under `cache`
    when `source` is not one already. `.npy` rows get the column `column`; Parquet keeps
    its vector columns' names (each a hookpoint)."""
    source = Path(source).expanduser().resolve()
    if not source.exists():
        raise ConfigError(f"--activations: {source}: no such file or directory")
    for candidate in (source, source / "train" / "tokens"):
        if (candidate / MANIFEST).is_file():
            return candidate
    files = _files(source)
    spec = {
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "column": column,
    }
    store = ArtifactStore(Path(cache).expanduser().resolve())
    art = store.get_or_compute("imported", spec, lambda out: _import(files, Path(out), column))
    return art.local()


def _import(files: list[Path], out: Path, column: str) -> None:
    writer: ShardWriter | None = None
    rows = 0
    for batch in _batches(files, column):
        n = len(next(iter(batch.values())))
        if writer is None:  # each column as wide as its vectors (a transcoder's pair)
            widths = {k: x.shape[1] for k, x in batch.items()}
            d = next(iter(widths.values()))
            writer = ShardWriter(out, "tokens", d, "float32", columns=list(batch), widths=widths)
        ids = pa.array(np.arange(rows, rows + n, dtype=np.int64))
        arrays = {k: vectors_to_arrow(x.astype(np.float32, copy=False)) for k, x in batch.items()}
        writer.write(pa.record_batch({"example_id": ids, **arrays}))
        rows += n
    if writer is None:
        raise ConfigError(f"--activations: {files[0].parent} holds no rows")
    writer.close()


def _batches(files: list[Path], column: str, rows: int = 65536):
    """Each file's rows as {column: (n, d) array} batches, without reading a file whole."""
    for path in files:
        if path.suffix == ".npy":
            x = np.load(path, mmap_mode="r")
            if x.ndim != 2:
                raise ConfigError(f"--activations: {path} is {x.ndim}-d; rows of (n, d) expected")
            for start in range(0, len(x), rows):
                yield {column: np.asarray(x[start : start + rows])}
            continue
        parquet = pq.ParquetFile(path)
        vectors = [f.name for f in parquet.schema_arrow if _is_vector(f.type)]
        if not vectors:
            raise ConfigError(f"--activations: {path} has no column of float vectors")
        for rb in parquet.iter_batches(batch_size=rows, columns=vectors):
            yield {name: _to_numpy(rb.column(name)) for name in vectors}


def _is_vector(kind: pa.DataType) -> bool:
    lists = pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind)
    return lists and pa.types.is_floating(kind.value_type)


def _to_numpy(column: pa.Array) -> np.ndarray:
    n = len(column)
    return column.flatten().to_numpy(zero_copy_only=False).reshape(n, -1)


def table_hookpoints(manifest: Manifest, transcode: bool, source: str) -> list[str]:
    """The SAEs a fit on this table trains: one per vector column, or, transcoding, one per
    `NAME` column that has its `NAME:input` beside it (ValueError naming `source` if none)."""
    if not transcode:
        return list(manifest.columns)
    found = [c for c in manifest.columns if c + INPUT in manifest.columns]
    if not found:
        raise ValueError(
            f"transcode: {source} has no NAME{INPUT} column beside a NAME column "
            f"(has {', '.join(manifest.columns)})"
        )
    return found


def train_on_activations(
    source: str | Path,
    sae: Sae | dict[str, Any] | None = None,
    save_dir: str | Path = "./output",
    run_name: str | None = None,
    resources: Resources | None = None,
    use_ray: bool = True,
    **fit: Any,
):
    """Train one SAE per vector column of `source` (a `.npy` file of rows, a folder of
    them, Parquet files, or a token table), with the sweep's `sae` config (a `Sae` or its
    dict), on Ray Train (`resources`: one CPU worker by default; Ray is started locally if
    it is not running) or, with `use_ray=False`, in this process from memory. Checkpoints
    land in `<save_dir>/<run_name>/<column>/` (sparsify's layout), exactly as `sae-ray
    train-sae --activations` writes them. `fit` sets the trainer's other options
    (`shuffle_seed`, `init_seed`, `max_steps`, `log_every`, ...); `variants=[{"k": 16},
    {"k": 32}]` co-trains one SAE per entry and column on the one stream, each in
    `<run_name>/<variant>/<column>/`.

    Returns the fitted SAEs and the final metrics (`SaeTrainResult`)."""
    from sae_ray.sae.fit_config import SaeTrainConfig

    sae = sae if isinstance(sae, Sae) else Sae(**(sae or {}))
    resume = fit.pop("resume", False)
    save_dir = Path(save_dir).expanduser().resolve()
    tokens = table_of(source, save_dir / ".activations")
    manifest = read_manifest(tokens)
    run_name = run_name or Path(source).stem
    try:
        hookpoints = table_hookpoints(manifest, sae.transcode, str(source))
        d_in = manifest.width(source_column(hookpoints[0], sae.transcode))
        cfg = SaeTrainConfig(
            **sae.model_dump(),
            hookpoints=hookpoints,
            d_in=d_in,
            widths={c: manifest.width(c) for c in manifest.columns},
            run_name=run_name,
            **fit,
        )
    except ValidationError as err:
        raise ConfigError(one_line(err)) from None
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if not use_ray:
        return _in_process(tokens, cfg.columns(), cfg, save_dir / run_name)
    return _on_ray(tokens, cfg.columns(), cfg, resources, save_dir, resume)


def _in_process(tokens, columns: list[str], cfg, run_dir: Path):
    import torch

    from sae_ray.sae.trainer import fit_in_process

    arrays = {c: torch.from_numpy(load_tokens(tokens, c)) for c in columns}
    return fit_in_process(arrays, cfg, run_dir)


def _on_ray(tokens, columns: list[str], cfg, resources, save_dir: Path, resume: bool):
    import ray

    from sae_ray.sae.feeds import fit_data
    from sae_ray.sae.trainer import train_saes

    if not ray.is_initialized():
        ray.init(configure_logging=False, log_to_driver=False)
    dataset, feed, rows = fit_data(tokens, columns, cfg.feed)
    return train_saes(
        dataset,
        rows,
        cfg,
        resources or Resources(num_workers=1, cpus_per_worker=1),
        storage_path=save_dir / ".ray_train",
        save_dir=save_dir / cfg.run_name,
        resume=resume,
        wandb_dir=save_dir,
        feed=feed,
    )
