"""Which bounds an SAE fit, the feed or the step, per width d: on the same machine, the
rows/s the fit's streamed feed delivers (`feeds.streamed_feed` over float32 shards of d-wide
rows, a consumer that only touches each batch, on the CPU as a worker reads) against the
tokens/s one SAE step consumes (`sae_step`'s ours: TopK, d x expansion latents, k 32, full
steps with Adam, bf16 autocast on CUDA) on the device.

One line per width: ours = the feed, theirs = the step, so a ratio above 1 (the target: the
feed keeps up) means the step bounds the fit and the feed waits, below 1 that the SAE waits
for the feed. Each side is the median of its runs, the feed's runs and the step's
alternated.

    python -m benchmarks.fit_bound          # d 256, 768, 1536; the step on a GPU if there is one
    python -m benchmarks.fit_bound --widths 768 --expansion_factor 32 --batch 4096
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.common import device_name, emit, interleaved, write_token_shards
from benchmarks.sae_step import _ours
from sae_ray.lm.extraction import read_manifest
from sae_ray.sae import feeds
from sae_ray.sae.fit_config import SaeTrainConfig

HOOKPOINT = "h"


def _feed(tokens: Path, d: int, batch: int):
    make = feeds.streamed_feed(str(tokens), read_manifest(tokens), [HOOKPOINT])
    cfg = SaeTrainConfig(hookpoints=[HOOKPOINT], d_in=d, batch_size=batch)

    def run() -> None:
        for b in make(cfg, 1, torch.device("cpu")).batches(None, 0):
            float(b[HOOKPOINT][0, 0])

    return run


def _step(d: int, args, device: str):
    step = _ours(d, d * args.expansion_factor, args.k, device, 0.0)
    x = torch.randn(args.batch, d, device=device)
    return lambda: step(x)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 768, 1536])
    parser.add_argument("--mbytes", type=int, default=256, help="stored rows per width, MB")
    parser.add_argument("--expansion_factor", type=int, default=8)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2048, help="tokens per step")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    sync = torch.cuda.synchronize if args.device == "cuda" else None
    out = []
    for d in args.widths:
        rows = args.mbytes * 2**20 // (4 * d)
        with tempfile.TemporaryDirectory() as tmp:
            tokens = Path(tmp) / "tokens"
            write_token_shards(tokens, rows, d, HOOKPOINT)
            seconds = interleaved(
                {"feed": _feed(tokens, d, args.batch), "step": _step(d, args, args.device)},
                args.repeats,
                sync=sync,
            )
        feed, step = rows / seconds["feed"], args.batch / seconds["step"]
        config = {
            "d_in": d,
            "num_latents": d * args.expansion_factor,
            "k": args.k,
            "batch": args.batch,
            "feed_rows": rows,
            "feed_gb_per_s": round(feed * d * 4 / 1e9, 3),
            "repeats": args.repeats,
        }
        out.append(
            emit(
                f"fit_bound_d{d}",
                feed,
                step,
                target=1.0,
                better="higher",
                unit="rows/s vs tokens/s",
                sides=("the streamed feed (CPU)", f"an SAE step ({args.device})"),
                config=config,
                device=device_name(args.device),
            )
        )
    return out


if __name__ == "__main__":
    main()
