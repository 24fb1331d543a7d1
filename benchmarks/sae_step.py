"""SAE training step tokens/s: ours vs eai-sparsify's SparseCoder, same config and device.

Both sides take full steps (forward, FVU, backward, parallel-gradient removal, Adam, decoder
renormalisation; sparsify as its Trainer does it, ours as ours does, which adds gradient
clipping) on the same batch, measured interleaved (A B A B ...) so machine noise
hits both alike. Prints one JSON line; `ratio` = ours / theirs, target >= 1.3.

    python -m benchmarks.sae_step                      # d_in 768, x32, k 32, 4096 tokens
    python -m benchmarks.sae_step --d_in 256 --steps 5 # quicker
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import device_name, emit, interleaved, sae_step_args


def _dead_mask(num_latents: int, dead_frac: float, device: str) -> torch.Tensor:
    dead = torch.zeros(num_latents, dtype=torch.bool, device=device)
    dead[: int(dead_frac * num_latents)] = True
    return dead


def _ours(d_in: int, num_latents: int, k: int, device: str, dead_frac: float):
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder
    from sae_ray.sae.training import DeadTracker, make_optimizer, train_step

    sae = SparseAutoencoder(SaeConfig(d_in, num_latents, k)).to(device)
    opt = make_optimizer("adam", sae.parameters(), lr=1e-4)
    tracker = DeadTracker(torch.zeros(num_latents, dtype=torch.long, device=device), 10**12)
    # the same latents dead on both sides: a finished window in which they never fired
    alive = ~_dead_mask(num_latents, dead_frac, device)
    tracker.prev_fires, tracker.prev_tokens = alive.long() * 10**6, 10**12
    use_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()

    def step(x):
        tracker.fires.zero_()  # keep the dead set fixed, as sparsify's side's mask is
        with torch.autocast(device, torch.bfloat16, enabled=use_bf16):  # as the trainer does
            return train_step(sae, sae, opt, x, tracker, 1 / 32)

    return step


def _theirs(d_in: int, num_latents: int, k: int, device: str, dead_frac: float):
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d_in, SparseCoderConfig(num_latents=num_latents, k=k), device=device)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)  # sparsify's trainer: torch's Adam
    dead = _dead_mask(num_latents, dead_frac, device)

    def step(x):  # the order of sparsify's Trainer.fit (its forward autocasts on CUDA)
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x, dead_mask=dead)
        (out.fvu + out.auxk_loss / 32).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sae_step_args(parser)
    parser.add_argument("--dead_frac", type=float, default=0.0, help="latents dead (AuxK on)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_latents = args.d_in * args.expansion_factor
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.d_in, device=device)
    ours = _ours(args.d_in, num_latents, args.k, device, args.dead_frac)
    theirs = _theirs(args.d_in, num_latents, args.k, device, args.dead_frac)
    sync = torch.cuda.synchronize if device == "cuda" else None
    secs = interleaved(
        {"ours": lambda: ours(x), "sparsify": lambda: theirs(x)}, args.steps, sync=sync
    )
    return emit(
        "sae_step_tokens_per_s",
        args.batch / secs["ours"],
        args.batch / secs["sparsify"],
        target=1.3,
        better="higher",
        unit="tokens/s",
        sides=("sae-ray", "eai-sparsify SparseCoder"),
        config={
            "d_in": args.d_in,
            "num_latents": num_latents,
            "k": args.k,
            "batch": args.batch,
            "steps": args.steps,
            "dead_frac": args.dead_frac,
            "threads": torch.get_num_threads(),
        },
        device=device_name(device),
    )


if __name__ == "__main__":
    main()
