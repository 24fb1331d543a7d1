"""SAE step achieved FLOP/s against a dense matmul of the encoder's shape on the same device
(bf16 on a GPU, fp32 on a CPU). The issue's GPU figure; it runs anywhere, labelled with the
device it ran on. Target >= 0.5 (ours: the encoder's matmul is the step's floor, the rest
is sparse and should cost little beside it).

FLOPs of one step, counted as the algorithm needs them: the encoder 2·B·d·L, the sparse
decoder forward 2·B·k·d, its backward 4·B·k·d, the encoder's sparse backward 2·B·k·d, so
2·B·d·L + 8·B·k·d. The matmul side is (B×d)·(d×L), 2·B·d·L FLOPs. Alternated A B A B.

    python -m benchmarks.gpu_flops                    # d_in 768, x32, k 32, 4096 tokens
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import device_name, emit, interleaved, sae_step_args
from benchmarks.sae_step import _ours


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sae_step_args(parser)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b, d, k = args.batch, args.d_in, args.k
    latents = d * args.expansion_factor
    torch.manual_seed(0)
    x = torch.randn(b, d, device=device)
    step = _ours(d, latents, k, device, dead_frac=0.0)
    a = torch.randn(b, d, device=device, dtype=dtype)
    w = torch.randn(d, latents, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device == "cuda" else None
    secs = interleaved({"sae": lambda: step(x), "matmul": lambda: a @ w}, args.steps, sync=sync)
    sae_flops = 2 * b * d * latents + 8 * b * k * d
    return emit(
        "sae_step_flops_vs_matmul",
        sae_flops / secs["sae"] / 1e12,
        2 * b * d * latents / secs["matmul"] / 1e12,
        target=0.5,
        better="higher",
        unit="TFLOP/s",
        sides=("SAE training step", f"{str(dtype).removeprefix('torch.')} matmul (B×d)·(d×L)"),
        config={"d_in": d, "num_latents": latents, "k": k, "batch": b, "steps": args.steps},
        device=device_name(device),
    )


if __name__ == "__main__":
    main()
