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
    architecture: str = "topk"  # topk | batchtopk | jumprelu | matryoshka (architectures.py)
    l0_coefficient: float = 1e-3  # jumprelu's L0 penalty, in FVU units per active latent
    matryoshka_widths: list[int] | None = None  # matryoshka's prefixes (default: n/8, /4, /2)
    target_l0: float | None = None  # jumprelu: a quadratic penalty around this L0 instead

    def __post_init__(self) -> None:
        if self.k > self.num_latents:
            raise ValueError(f"sae.k: {self.k} is larger than the {self.num_latents} latents")


class Codes(NamedTuple):
    values: torch.Tensor  # (batch, k), >= 0; other architectures: the widest row's count
    indices: torch.Tensor  # (batch, k)
    aux_values: torch.Tensor  # (batch, k_aux): top dead latents, for AuxK; k_aux may be 0
    aux_indices: torch.Tensor  # (batch, k_aux)
    dense: torch.Tensor | None = None  # (batch, latents): the non-TopK architectures' codes
    penalty: torch.Tensor | None = None  # jumprelu in training: Σ L0 over the rows
    # BatchTopK / Matryoshka / JumpReLU in training: values and indices are flat (pairs,),
    # sorted by row, and row i's pairs start at offsets[i] (CSR; a row may hold any number)
    offsets: torch.Tensor | None = None


def _latent_rows(indices: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, m: int):
    """Σ_n g_nj x_n for every latent j, touching only the selected (n, j) pairs (each
    row of `indices` the latents picked for that row of x)."""
    rows = torch.arange(len(x), device=x.device).repeat_interleave(indices.shape[1])
    return latent_rows(rows, indices.reshape(-1), grads.reshape(-1), x, m)


def latent_rows(
    rows: torch.Tensor, cols: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, m: int
) -> torch.Tensor:
    """Σ_n g_nj x_n for every latent j over the pairs (rows[i], cols[i]) with weight grads[i].

    A transposed embedding_bag: sort the pairs by latent, then bag rows of x per latent.
    Costs O(pairs·d) instead of the dense O(batch·latents·d) of `pre.T @ x`.
    """
    order = cols.argsort()
    counts = torch.bincount(cols, minlength=m)
    offsets = counts.cumsum(0) - counts
    weights = grads[order].to(x.dtype)
    return F.embedding_bag(rows[order], x, offsets, mode="sum", per_sample_weights=weights)


def encoder_pre(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """W_enc x + b_enc, in autocast's dtype when it is on (the encoders' own Functions run
    outside autocast, which would not see inside them)."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return torch.addmm(bias.to(dt), x.to(dt), weight.to(dt).t())


def aux_candidates(pre: torch.Tensor, dead_idx: torch.Tensor | None, k_aux: int):
    """AuxK's (values, latents): each row's top `k_aux` dead latents (Gao et al. B.1),
    ReLU'd; none without dead latents."""
    if dead_idx is None or k_aux == 0:
        empty = pre.new_zeros(len(pre), 0)
        return empty, empty.long()
    araw, pos = pre.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
    return araw.clamp_min(0), dead_idx[pos]


class _TopKEncode(torch.autograd.Function):
    """TopK(ReLU(W_enc x + b_enc)) with a backward that scales with k, not with latents.

    Only the selected pre-activations get gradient, so the encoder's backward is sparse
    (as in sparsify's fused encoder) and the ReLU is applied to the k winners, not to the
    whole (batch, latents) matrix. The AuxK candidates (top dead latents) are picked in the
    same pass and share the sparse backward, so AuxK also trains the encoder.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, dead_idx, k_aux: int):
        pre = encoder_pre(x, weight, bias)
        raw, indices = pre.topk(k, dim=-1, sorted=False)
        values = raw.clamp_min(0)
        aux_values, aux_indices = aux_candidates(pre, dead_idx, k_aux)
        ctx.save_for_backward(x, weight, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_indices, g_aux, _g_aux_indices):
        x, weight, indices, values, aux_indices, aux_values = ctx.saved_tensors
        # ReLU: no gradient where the selected pre-activation was not positive.
        grads = torch.cat([g_values * (values > 0), g_aux * (aux_values > 0)], 1)
        grads = grads.to(weight.dtype)
        picked = torch.cat([indices, aux_indices], 1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(picked, weight, mode="sum", per_sample_weights=grads)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _latent_rows(picked, grads, x.to(weight.dtype), weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, picked.reshape(-1), grads.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


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
        if cfg.architecture in ("batchtopk", "matryoshka"):  # the inference threshold
            self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))
        elif cfg.architecture == "jumprelu":
            self.log_threshold = nn.Parameter(torch.zeros(cfg.num_latents))
            self.register_buffer("input_scale", torch.ones(()))
        elif cfg.architecture != "topk":
            raise ValueError(f"architecture: {cfg.architecture!r} is not an SAE sae-ray knows")

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor) -> None:
        """b_dec from the data (mean), so the encoder sees centred inputs from step one; a
        JumpReLU's thresholds start at a fixed fraction of the input's scale or, with a
        target L0 T, where this batch's mean L0 is T (BatchTopK's first-batch threshold):
        Adam moves a log-threshold by about lr a step, too slowly to find T from afar."""
        x = x.float()
        self.b_dec.data.copy_(x.mean(0).to(self.b_dec.dtype))
        if self.cfg.architecture == "jumprelu":
            from sae_ray.sae.architectures import INIT_THRESHOLD

            scale = (x - x.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6)
            self.input_scale.copy_(scale)
            theta = INIT_THRESHOLD * float(scale)
            if self.cfg.target_l0 is not None:
                w = self.encoder.weight.float()
                pre = F.linear(x - self.b_dec.float(), w, self.encoder.bias.float()).flatten()
                on = min(max(1, round(self.cfg.target_l0 * len(x))), len(pre))
                theta = max(float(pre.topk(on).values[-1]), theta)
            self.log_threshold.data.fill_(math.log(theta))

    def encode(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> Codes:
        """TopK codes (or the architecture's); with a `dead` mask also the AuxK candidates
        (Gao et al. B.1: the top d/2 dead latents)."""
        if self.cfg.architecture != "topk":
            from sae_ray.sae.architectures import dense_encode

            return dense_encode(self, x, dead)
        dead_idx, k_aux = None, 0
        if dead is not None and bool(dead.any()):
            dead_idx = dead.nonzero().squeeze(1)
            k_aux = min(self.cfg.d_in // 2, len(dead_idx))
        values, indices, aux_values, aux_indices = _TopKEncode.apply(
            x - self.b_dec, self.encoder.weight, self.encoder.bias, self.cfg.k, dead_idx, k_aux
        )
        return Codes(values, indices, aux_values, aux_indices)

    def decode_sparse(
        self, values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Σ_j z_j W_dec[j] over the active indices only (without b_dec); with `offsets`,
        flat CSR codes (`Codes.offsets`)."""
        return F.embedding_bag(
            indices,
            self.W_dec,
            offsets,
            per_sample_weights=values.to(self.W_dec.dtype),
            mode="sum",
        )

    def forward(
        self, x: torch.Tensor, dead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Codes]:
        codes = self.encode(x, dead)
        if codes.dense is not None:
            return self.decode_dense(codes.dense), codes
        return self.decode_sparse(codes.values, codes.indices, codes.offsets) + self.b_dec, codes

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        if codes.dense is not None:
            return codes.dense
        dense = codes.values.new_zeros(len(x), self.cfg.num_latents)
        if codes.offsets is not None:  # CSR: row i holds the pairs from offsets[i]
            counts = torch.diff(codes.offsets, append=codes.offsets.new_tensor([len(codes.values)]))
            rows = torch.arange(len(x), device=x.device).repeat_interleave(counts)
            return dense.index_put_((rows, codes.indices), codes.values)
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
        return sae.eval()  # BatchTopK encodes by its threshold, not by the batch


def default_lr(num_latents: int) -> float:
    """Gao et al.'s scaling: lr ∝ 1/sqrt(latents), 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


@torch.no_grad()
def decoder_absorption(w_dec: torch.Tensor, top: int = 100, sample: int = 4096, seed: int = 0):
    """Absorption proxy: mean of the `top` largest cosine similarities between distinct
    decoder rows (each pair once). Near-duplicate latents split or absorb one feature; on
    more than `sample` latents a fixed random sample keeps this O(sample²)."""
    w = w_dec.float()
    if len(w) > sample:
        gen = torch.Generator(device="cpu").manual_seed(seed)
        w = w[torch.randperm(len(w), generator=gen)[:sample].to(w.device)]
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-8)
    n = len(w)
    upper = torch.ones(n, n, dtype=torch.bool, device=w.device).triu(1)
    cos = (w @ w.T).masked_fill_(~upper, -torch.inf).flatten()
    return cos.topk(min(top, n * (n - 1) // 2)).values.mean().item()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖²."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(1e-12)


def auxk_loss(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    codes: Codes,
    num_dead: int,
    total_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dead latents learn to explain what the live ones miss (residual detached).

    `codes` must come from `encode(x, dead)` so it carries the top dead latents. Normalised
    like the main loss, by the input's Σ‖x − mean(x)‖² (as sparsify does), so the two terms
    share a scale; under DDP pass the all-workers value as `total_variance`.
    """
    if num_dead == 0 or codes.aux_indices.shape[1] == 0:
        return x.new_zeros(())
    # Gao et al. B.1: k_aux = d/2, and the loss shrinks when fewer latents than that are dead.
    scale = min(num_dead / (x.shape[-1] // 2), 1.0)
    residual = (x - x_hat).detach()
    e_hat = sae.decode_sparse(codes.aux_values, codes.aux_indices)  # b_dec counted once
    if total_variance is None:
        total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return scale * (residual - e_hat).pow(2).sum() / total_variance
