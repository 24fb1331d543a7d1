"""The TopK sparse autoencoder (Gao et al. 2024; EleutherAI/sparsify's formulation).

z = TopK(W_enc(x − b_dec) + b_enc), x̂ = W_dec z + b_dec, decoder rows unit norm. The
decode is sparse (embedding_bag over the k active rows), so its cost grows with k and not
with the number of latents. Metrics (L0, dead) are read off these TopK codes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass
class SaeConfig:
    d_in: int
    num_latents: int
    k: int

    def __post_init__(self) -> None:
        if self.k > self.num_latents:
            raise ValueError(f"sae.k: {self.k} is larger than the {self.num_latents} latents")


class Codes(NamedTuple):
    values: torch.Tensor  # (batch, k), >= 0
    indices: torch.Tensor  # (batch, k)
    pre: torch.Tensor  # (batch, num_latents) pre-activations, for AuxK


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents)
        self.encoder.bias.data.zero_()
        # W_dec starts as W_encᵀ with unit rows: each latent first reconstructs what it reads.
        self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.set_decoder_norm_to_unit_norm()

    def init_b_dec(self, x: torch.Tensor) -> None:
        """b_dec from the data (mean), so the encoder sees centred inputs from step one."""
        self.b_dec.data.copy_(x.float().mean(0).to(self.b_dec.dtype))

    def encode(self, x: torch.Tensor) -> Codes:
        pre = F.relu(self.encoder(x - self.b_dec))
        values, indices = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return Codes(values, indices, pre)

    def decode_sparse(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Σ_j z_j W_dec[j] over the active indices only (without b_dec)."""
        return F.embedding_bag(
            indices, self.W_dec, per_sample_weights=values.to(self.W_dec.dtype), mode="sum"
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Codes]:
        codes = self.encode(x)
        return self.decode_sparse(codes.values, codes.indices) + self.b_dec, codes

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        dense = torch.zeros_like(codes.pre)
        return dense.scatter_(-1, codes.indices, codes.values)

    def decode_dense(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Keep the unit-norm constraint honest: Adam should not push rows off the sphere."""
        if self.W_dec.grad is None:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data

    def save(self, directory: Path) -> None:
        """sparsify's layout and tensor names: `SparseCoder.load_from_disk` reads it as is."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "sae.safetensors"))
        (directory / "cfg.json").write_text(json.dumps(asdict(self.cfg), indent=1))

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> SparseAutoencoder:
        cfg = SaeConfig(**json.loads((directory / "cfg.json").read_text()))
        sae = cls(cfg)
        sae.load_state_dict(load_file(str(directory / "sae.safetensors"), device=device))
        return sae


def default_lr(num_latents: int) -> float:
    """Gao et al.'s scaling: lr ∝ 1/sqrt(latents), 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖²."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(1e-12)


def auxk_loss(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    pre: torch.Tensor,
    dead: torch.Tensor,
    total_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dead latents learn to explain what the live ones miss (residual detached).

    Normalised like the main loss, by the input's Σ‖x − mean(x)‖² (as sparsify does), so the
    two terms share a scale; under DDP pass the all-workers value as `total_variance`.
    """
    num_dead = int(dead.sum())
    if num_dead == 0:
        return x.new_zeros(())
    # Gao et al. B.1: k_aux = d/2, and the loss shrinks when fewer latents than that are dead.
    k_aux = min(x.shape[-1] // 2, num_dead)
    scale = min(num_dead / (x.shape[-1] // 2), 1.0)
    residual = (x - x_hat).detach()
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    values, indices = masked.topk(k_aux, dim=-1, sorted=False)
    e_hat = sae.decode_sparse(values, indices)  # b_dec is counted once, in x_hat
    if total_variance is None:
        total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return scale * (residual - e_hat).pow(2).sum() / total_variance
