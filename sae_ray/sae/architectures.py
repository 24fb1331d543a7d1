"""The SAEs beside TopK: BatchTopK, JumpReLU and Matryoshka (BatchTopK with nested prefixes).

They share TopK's parameters (`encoder`, `W_dec` with unit rows, `b_dec`), its AuxK on dead
latents and its codes (`Codes`, padded to the widest row: an inactive slot has value 0), and
add what their papers and SAELens / dictionary_learning add:

- **BatchTopK** (Bussmann et al. 2024): in training the batch's `k x rows` largest ReLU
  pre-activations, over all rows together; a threshold θ follows, as an exponential moving
  average (rate 0.01, SAELens' `topk_threshold_lr`; the first batch sets it, as in
  dictionary_learning), the smallest selected activation. At inference a latent fires
  where its pre-activation exceeds θ (a JumpReLU with one θ).
- **JumpReLU** (Rajamanoharan et al. 2024): z = pre · H(pre − θ_j) with a learned θ per
  latent (kept as its log); the threshold's gradient is the straight-through estimate of
  the paper and SAELens (a rectangle kernel of bandwidth ε), and the loss adds
  `l0_coefficient · L0` (the same estimate). θ starts at 0.01 and ε is 0.05, SAELens 6.5x's
  defaults, both in units of the input's per-coordinate scale (SAELens' assume normalised
  activations).
- **Matryoshka** (Bussmann et al. 2025, dictionary_learning): BatchTopK codes, and the loss
  is the mean over nested prefixes (widths m₁ < m₂ < ... < latents) of the FVU of the
  reconstruction from the first mᵢ latents alone.

Their codes come out dense (rows x latents) and decode densely: a JumpReLU's threshold
learns from the loss's gradient at latents that did not fire, which a sparse decode drops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from sae_ray.sae.model import Codes, SparseAutoencoder

THRESHOLD_LR = 0.01  # BatchTopK's θ: SAELens' topk_threshold_lr
BANDWIDTH = 0.05  # JumpReLU's ε, x the input's per-coordinate scale (SAELens 6.5x's)
INIT_THRESHOLD = 0.01  # JumpReLU's initial θ, x the same scale (SAELens 6.5x's)


def _rectangle(x: torch.Tensor) -> torch.Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); ∂/∂pre passes where it fired, ∂/∂θ is the straight-through
    estimate −(θ/ε)·rect((pre − θ)/ε) summed over rows."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (-(theta / eps) * _rectangle((pre - theta) / eps) * grad).sum(0)
        return (pre > theta) * grad, grad_theta, None


class Step(torch.autograd.Function):
    """H(pre − θ), the L0 per latent; ∂/∂θ is −(1/ε)·rect((pre − θ)/ε), none to pre."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        pre, theta = ctx.saved_tensors
        eps = ctx.eps
        return None, (-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad).sum(0), None


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The `k x rows` largest ReLU pre-activations of the whole batch, the rest 0."""
    acts = pre.relu()
    top = acts.flatten().topk(min(k * len(pre), acts.numel()))
    return torch.zeros_like(acts).flatten().scatter(0, top.indices, top.values).view_as(acts)


@torch.no_grad()
def update_threshold(sae: SparseAutoencoder, z: torch.Tensor) -> None:
    """θ ← (1 − rate)·θ + rate·(smallest positive selected activation, over all workers)."""
    from sae_ray.sae.training import all_reduce

    positive = z[z > 0]
    low = positive.min().double() if len(positive) else torch.tensor(torch.inf).to(z.device)
    low = all_reduce(low.reshape(1).clone(), torch.distributed.ReduceOp.MIN)[0]
    if torch.isfinite(low):
        theta = sae.threshold
        if theta == 0:  # the first batch sets it (dictionary_learning's start): no warm-up
            theta.copy_(low)
        else:
            theta.copy_((1 - THRESHOLD_LR) * theta + THRESHOLD_LR * low.to(theta))


def padded(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes as (values, indices) of the widest row's count (at least k): the shape
    every TopK consumer reads; an inactive slot is 0."""
    width = min(max(k, int((z > 0).sum(-1).max()) if len(z) else k), z.shape[-1])
    top = z.topk(width, dim=-1)
    return top.values, top.indices


def dense_encode(sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None) -> Codes:
    """Codes of the non-TopK architectures: training rule in training mode (BatchTopK's
    batch selection, JumpReLU's straight-through threshold and L0), inference otherwise."""
    from sae_ray.sae.model import Codes

    cfg = sae.cfg
    pre = F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias)
    penalty = None
    if cfg.architecture == "jumprelu":
        theta = sae.log_threshold.exp()
        eps = BANDWIDTH * float(sae.input_scale)
        z = JumpReLU.apply(pre, theta, eps)
        if sae.training:
            penalty = Step.apply(pre, theta, eps).sum()
    elif sae.training:
        z = batch_topk(pre, cfg.k)
        update_threshold(sae, z.detach())
    else:
        z = pre.relu() * (pre > sae.threshold.to(pre.dtype))
    with torch.no_grad():
        values, indices = padded(z.detach(), cfg.k)
    aux_values, aux_indices = values[:, :0], indices[:, :0]
    if dead is not None and bool(dead.any()):
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(cfg.d_in // 2, len(dead_idx))
        araw, pos = pre.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
        aux_values, aux_indices = araw.relu(), dead_idx[pos]
    return Codes(values, indices, aux_values, aux_indices, dense=z, penalty=penalty)


def levels(sae: SparseAutoencoder) -> list[int]:
    """Matryoshka's prefix widths, the whole dictionary last."""
    n = sae.cfg.num_latents
    widths = sae.cfg.matryoshka_widths or [w for w in (n // 8, n // 4, n // 2) if w >= sae.cfg.k]
    return [w for w in widths if w < n] + [n]


def prefix_reconstructions(sae: SparseAutoencoder, z: torch.Tensor) -> list[torch.Tensor]:
    """x̂ from the first m latents for each Matryoshka level m (cumulative: one decode)."""
    out, x_hat, start = [], sae.b_dec.expand(len(z), -1), 0
    for width in levels(sae):
        x_hat = x_hat + z[:, start:width] @ sae.W_dec[start:width]
        out.append(x_hat)
        start = width
    return out
