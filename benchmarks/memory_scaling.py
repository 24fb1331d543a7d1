"""Memory scaling: peak RSS of extraction and of SAE training at 4x the data vs 1x.
Target <= 1.2 for each (streaming: nothing is held whole).

Extraction runs in a fresh process per size (its peak is that process's high-water mark:
model, batches, writers). SAE training is `train_saes` on token shards (large enough that
Ray Data streams them); its figure is the Train worker's own peak, which it reports. Each
line's config gives the data sizes, so a reader can see how much a held-whole copy would
have added.

    python -m benchmarks.memory_scaling
    python -m benchmarks.memory_scaling --only extraction --examples 1000
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import ray

from benchmarks.common import device_name, emit, peak_rss_mb, start_ray, write_token_shards
from benchmarks.ray_data_feed import WatchedFeed

HOOKPOINT = "h"
STATUS_KEYS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def _status_mb() -> dict[str, float]:
    """This process's resident memory by kind (Linux): RssAnon is its own heap; RssShmem
    the shared-memory pages it has touched, which include the Ray object store's arena."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) / 1024
    return out


class SampledFeed(WatchedFeed):
    """The worker's memory by kind, sampled as each batch arrives: the peaks."""

    def watch(self, waited: float) -> None:
        for key, mb in _status_mb().items():
            self.state[key] = max(self.state.get(key, 0.0), mb)


def _extract_peak(model: str, examples: int, layer: int, max_length: int) -> tuple[float, int]:
    """In a fresh process: extract one split; (peak RSS MB, bytes written)."""
    from benchmarks.extraction import setup
    from sae_ray.lm.extraction import extract

    clf, split = setup(model, examples, max_length)
    with tempfile.TemporaryDirectory() as tmp:
        extract(clf, split, layer, Path(tmp), max_length)
        written = sum(p.stat().st_size for p in Path(tmp).rglob("*.parquet"))
    return peak_rss_mb(), written


def extraction(args) -> dict:
    peaks, sizes = {}, {}
    for scale in (1, 4):
        with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
            job = pool.submit(
                _extract_peak, args.model, args.examples * scale, args.layer, args.max_length
            )
            peaks[scale], sizes[scale] = job.result()
    return emit(
        "extraction_peak_rss_4x_vs_1x",
        peaks[4],
        peaks[1],
        target=1.2,
        better="lower",
        unit="MB",
        sides=("4x the examples", "1x"),
        config={
            "model": args.model,
            "layer": args.layer,
            "examples_1x": args.examples,
            "max_length": args.max_length,
            "written_mb": {f"{s}x": round(b / 2**20) for s, b in sizes.items()},
        },
        device=device_name("cpu"),
    )


def sae_training(args) -> dict:
    from sae_ray.config import Resources
    from sae_ray.sae.feeds import MATERIALIZE_BYTES, activation_dataset
    from sae_ray.sae.fit_config import SaeTrainConfig
    from sae_ray.sae.trainer import train_saes

    start_ray(2, __name__, "benchmarks.ray_data_feed")
    cfg = SaeTrainConfig(
        hookpoints=[HOOKPOINT],
        d_in=args.d_in,
        k=32,
        expansion_factor=8,
        batch_size=4096,
        epochs=1,
        log_every=10**6,
        save_every=10**6,
        progress=False,
    )
    peaks, kinds = {}, {}
    rows = {s: args.rows * s for s in (1, 4)}
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (1, 4):
            tokens = Path(tmp) / f"tokens-{scale}"
            write_token_shards(tokens, rows[scale], args.d_in, HOOKPOINT)
            dataset, n = activation_dataset(tokens, [HOOKPOINT])
            train_saes(
                dataset,
                n,
                cfg,
                Resources(num_workers=1, cpus_per_worker=1),
                Path(tmp) / "runs",
                train_run_name=f"sae-{scale}x",
                feed=SampledFeed.factory(str(Path(tmp) / f"memory-{scale}.json")),
            )
            kinds[scale] = json.loads((Path(tmp) / f"memory-{scale}.json").read_text())
            peaks[scale] = kinds[scale]["RssAnon"]
    ray.shutdown()
    mb = {f"{s}x": round(r * args.d_in * 4 / 2**20) for s, r in rows.items()}
    return emit(
        "sae_training_peak_rss_4x_vs_1x",
        peaks[4],
        peaks[1],
        target=1.2,
        better="lower",
        unit="MB",
        sides=("4x the tokens", "1x"),
        config={
            "d_in": args.d_in,
            "rows_1x": args.rows,
            "activations_mb": mb,
            "streamed": rows[1] * args.d_in * 4 > MATERIALIZE_BYTES,
            "measured": "the Train worker's peak RssAnon (its own memory), sampled each batch",
            # and by kind: RssShmem counts object-store pages the worker has read through
            "peaks_mb": {f"{s}x": {k: round(v) for k, v in p.items()} for s, p in kinds.items()},
        },
        device=device_name("cpu"),
    )


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["extraction", "sae_training"])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--examples", type=int, default=4000, help="1x synthetic:topics size")
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--rows", type=int, default=300_000, help="1x token rows")
    parser.add_argument("--d_in", type=int, default=256)
    args = parser.parse_args(argv)
    figures = {"extraction": extraction, "sae_training": sae_training}
    return [fn(args) for name, fn in figures.items() if args.only in (None, name)]


if __name__ == "__main__":
    main()
