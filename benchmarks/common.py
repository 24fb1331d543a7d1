"""What every figure shares: the JSON line, the device's name, interleaved timing, peak RSS.

A figure is a ratio of two sides measured in the same run, alternated (A B A B ...) so the
machine's noise falls on both; the median of each side's repeats is its value.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch


def device_name(device: str | torch.device = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"cpu x{os.cpu_count()} ({model})"


def emit(
    name: str,
    ours: float,
    theirs: float,
    target: float,
    better: Literal["higher", "lower"],
    config: dict[str, Any],
    device: str,
    unit: str = "",
    sides: tuple[str, str] = ("ours", "theirs"),
) -> dict[str, Any]:
    """Print the figure's one JSON line (ratio = ours / theirs) and return it."""
    ratio = ours / theirs if theirs else float("nan")
    met = ratio >= target if better == "higher" else ratio <= target
    line = {
        "name": name,
        "ours": float(f"{ours:.5g}"),
        "theirs": float(f"{theirs:.5g}"),
        "ratio": float(f"{ratio:.4g}"),
        "target": target,
        "better": better,
        "met": bool(met),
        "unit": unit,
        "sides": list(sides),
        "config": config,
        "device": device,
    }
    print(json.dumps(line), flush=True)
    return line


def interleaved(
    sides: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each side, the sides alternated call by call."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def sae_step_args(parser) -> None:
    """The SAE step's shape, shared by the figures that time one (sparsify's defaults)."""
    parser.add_argument("--d_in", type=int, default=768)
    parser.add_argument("--expansion_factor", type=int, default=32)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4096, help="tokens per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side")


def one_pass_fit(hookpoint: str, d_in: int, batch: int, **settings: Any):
    """A fit config for a figure: one pass over the rows, no logs or checkpoints mid-run
    (they would be timed too), no progress bar."""
    from sae_ray.sae.fit_config import SaeTrainConfig

    return SaeTrainConfig(
        hookpoints=[hookpoint],
        d_in=d_in,
        batch_size=batch,
        epochs=1,
        log_every=10**9,
        save_every=10**9,
        progress=False,
        **settings,
    )


def peak_rss_mb() -> float:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def start_ray(num_cpus: int, *modules: str) -> None:
    """A local Ray cluster for a figure. `modules` (the figure's own, defining the feeds the
    workers build) travel to the workers by value, so the workers need not import them."""
    import logging
    import sys

    import cloudpickle
    import ray

    for name in modules:
        cloudpickle.register_pickle_by_value(sys.modules[name])
    ray.init(num_cpus=num_cpus, logging_level=logging.WARNING, log_to_driver=False)


def write_token_shards(out: Path, rows: int, d: int, column: str = "h", seed: int = 0):
    """`rows` random activation rows as token shards with a manifest, written in chunks (the
    benchmarks' input: the SAE's speed does not depend on what the numbers are)."""
    from sae_ray.lm.extraction import ShardWriter, vectors_to_arrow

    writer = ShardWriter(out, "tokens", d, "float32", rows_per_shard=100_000, columns=[column])
    rng = np.random.default_rng(seed)
    for start in range(0, rows, 20_000):
        n = min(20_000, rows - start)
        x = rng.standard_normal((n, d), dtype=np.float32)
        ids = np.arange(start, start + n) // 32  # 32 tokens per example
        writer.write(pa.record_batch({"example_id": ids, column: vectors_to_arrow(x)}))
    return writer.close()
