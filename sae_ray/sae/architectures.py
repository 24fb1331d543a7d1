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
  `l0_coefficient · L0` (the same estimate), or with `target_l0` T the quadratic
  `l0_coefficient · 2/T·(L0 − T)²` per row (Gemma Scope 2, SAELens' quadratic mode). θ
  starts at 0.01 and ε is 0.05, SAELens 6.5x's defaults, both in units of the input's
  per-coordinate scale (SAELens' assume normalised activations).
- **Matryoshka** (Bussmann et al. 2025, dictionary_learning): BatchTopK codes, and the loss
  is the mean over nested prefixes (widths m₁ < m₂ < ... < latents) of the FVU of the
  reconstruction from the first mᵢ latents alone.

In training all three are sparse like TopK: one dense encoder matmul, then the picked
(row, latent) pairs as CSR codes (a row holds any number), decoded by embedding_bag over
those pairs only, with a backward that touches only them. BatchTopK picks the batch's
selection; a JumpReLU the pairs that fired and those inside its thresholds' window, which
decode as zeros but carry the loss's gradient to θ (the straight-through estimate needs it
there). At inference all three give dense codes.
"""

from __future__ import annotations

from collections.abc import Callable
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


def _like(grad: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """θ's gradient in θ's shape: summed over rows for a (rows, latents) input, as is for
    one θ per pair (CSR codes)."""
    return grad.sum(0) if grad.dim() > theta.dim() else grad


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
        grad_theta = -(theta / eps) * _rectangle((pre - theta) / eps) * grad
        return (pre > theta) * grad, _like(grad_theta, theta), None


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
        return None, _like(-(1.0 / eps) * _rectangle((pre - theta) / eps) * grad, theta), None


class _PairsEncode(torch.autograd.Function):
    """W_enc x + b_enc at the (row, latent) pairs `select` picks from the whole matrix, as
    CSR codes, with TopK's sparse backward: only the picked pairs and the AuxK candidates
    carry gradient, so the encoder's backward costs pairs x d, not rows x latents x d."""

    @staticmethod
    def forward(ctx, x, weight, bias, select: Callable, dead_idx, k_aux: int):
        from sae_ray.sae.model import aux_candidates, encoder_pre

        pre = encoder_pre(x, weight, bias)
        n, m = pre.shape
        flat = select(pre)  # ascending: each row's pairs together
        values = pre.flatten()[flat]
        rows, cols = flat // m, flat % m
        counts = torch.bincount(rows, minlength=n)
        offsets = counts.cumsum(0) - counts
        aux_values, aux_indices = aux_candidates(pre, dead_idx, k_aux)
        ctx.save_for_backward(x, weight, rows, cols, offsets, aux_indices, aux_values)
        ctx.mark_non_differentiable(rows, cols, offsets, aux_indices)
        return values, rows, cols, offsets, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_rows, _g_cols, _g_offsets, g_aux, _g_aux_indices):
        from sae_ray.sae.model import latent_rows

        x, weight, rows, cols, offsets, aux_indices, aux_values = ctx.saved_tensors
        grads = g_values.to(weight.dtype)
        aux_grads = (g_aux * (aux_values > 0)).to(weight.dtype)  # AuxK's ReLU
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=grads)
            if aux_indices.shape[1]:
                grad_x = grad_x + F.embedding_bag(
                    aux_indices, weight, mode="sum", per_sample_weights=aux_grads
                )
            grad_x = grad_x.to(x.dtype)
        aux_rows = torch.arange(len(x), device=x.device).repeat_interleave(aux_indices.shape[1])
        all_rows = torch.cat([rows, aux_rows])
        all_cols = torch.cat([cols, aux_indices.reshape(-1)])
        all_grads = torch.cat([grads, aux_grads.reshape(-1)])
        if ctx.needs_input_grad[1]:
            grad_w = latent_rows(all_rows, all_cols, all_grads, x.to(weight.dtype), len(weight))
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, all_cols, all_grads)
        return grad_x, grad_w, grad_b, None, None, None


CANDIDATES = 4  # BatchTopK looks first among each row's CANDIDATES x k largest


def _batch_top(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """BatchTopK's pick: the `k x rows` largest of the whole batch.

    A topk over the whole (rows x latents) matrix costs 3x the encoder's matmul on a CPU,
    so the pick is made among each row's `CANDIDATES x k` largest. That is exact unless a
    row had all its candidates picked (it might have had more): then the whole matrix."""

    def select(pre: torch.Tensor) -> torch.Tensor:
        n, m = pre.shape
        total, width = min(k * n, pre.numel()), min(m, CANDIDATES * k)
        if width < m:
            values, cols = pre.topk(width, dim=-1, sorted=False)
            top = values.flatten().topk(total, sorted=False).indices
            rows = top // width
            if not bool((torch.bincount(rows, minlength=n) == width).any()):
                return (rows * m + cols.flatten()[top]).sort()[0]
        return pre.flatten().topk(total, sorted=False).indices.sort()[0]

    return select


def _near_or_above(theta: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """JumpReLU's pick: every pre-activation that fired or lies in the threshold's window
    (where the straight-through estimate gives θ a gradient); the rest carry none."""

    def select(pre: torch.Tensor) -> torch.Tensor:
        return (pre > (theta - eps / 2).to(pre.dtype)).flatten().nonzero().squeeze(1)

    return select


def sparse_train_encode(
    sae: SparseAutoencoder, x: torch.Tensor, dead: torch.Tensor | None
) -> Codes:
    """Training codes of BatchTopK / Matryoshka / JumpReLU as CSR (`Codes.offsets`), AuxK
    candidates included: BatchTopK's θ moves by this batch's smallest selected activation;
    a JumpReLU's codes keep zeros at the window's unfired pairs, so that its thresholds get
    the loss's gradient there."""
    from sae_ray.sae.model import Codes

    dead_idx, k_aux = None, 0
    if dead is not None and bool(dead.any()):
        dead_idx = dead.nonzero().squeeze(1)
        k_aux = min(sae.cfg.d_in // 2, len(dead_idx))
    if sae.cfg.architecture == "jumprelu":
        theta = sae.log_threshold.exp()
        eps = BANDWIDTH * float(sae.input_scale)
        select = _near_or_above(theta.detach(), eps)
    else:
        select = _batch_top(sae.cfg.k)
    pre, rows, cols, offsets, aux_values, aux_indices = _PairsEncode.apply(
        x - sae.b_dec, sae.encoder.weight, sae.encoder.bias, select, dead_idx, k_aux
    )
    penalty = None
    if sae.cfg.architecture == "jumprelu":
        theta_at = theta[cols]
        values = JumpReLU.apply(pre, theta_at, eps)
        fired = Step.apply(pre, theta_at, eps)
        l0 = torch.zeros(len(x), dtype=fired.dtype, device=x.device).index_add(0, rows, fired)
        penalty = l0_penalty(l0, sae.cfg.target_l0)
    else:
        values = pre.relu()
        update_threshold(sae, values.detach())
    return Codes(values, cols, aux_values, aux_indices, penalty=penalty, offsets=offsets)


def l0_penalty(l0: torch.Tensor, target: float | None) -> torch.Tensor:
    """Σ over rows of L0 (DeepMind's JumpReLU), or with a target T of 2/T·(L0 − T)², Gemma
    Scope 2's quadratic penalty (SAELens' "quadratic" mode), which holds L0 near T instead
    of pushing it down at a rate the coefficient's units decide."""
    if target is None:
        return l0.sum()
    return (2 / target * (l0 - target).pow(2)).sum()


@torch.no_grad()
def update_threshold(sae: SparseAutoencoder, z: torch.Tensor) -> None:
    """θ ← (1 − rate)·θ + rate·(smallest positive selected activation, over all workers)."""
    from sae_ray.distributed.ranks import all_reduce

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
    """Codes of the non-TopK architectures: the training rule in training mode (sparse,
    `sparse_train_encode`), else the inference rule (BatchTopK's threshold θ, JumpReLU's
    per-latent thresholds) as dense codes and their padded (values, indices)."""
    from sae_ray.sae.model import Codes

    if sae.training:
        return sparse_train_encode(sae, x, dead)
    pre = F.linear(x - sae.b_dec, sae.encoder.weight, sae.encoder.bias)
    if sae.cfg.architecture == "jumprelu":
        z = pre * (pre > sae.log_threshold.exp())
    else:
        z = pre.relu() * (pre > sae.threshold.to(pre.dtype))
    values, indices = padded(z.detach(), sae.cfg.k)
    return Codes(values, indices, values[:, :0], indices[:, :0], dense=z)


def levels(sae: SparseAutoencoder) -> list[int]:
    """Matryoshka's prefix widths, the whole dictionary last."""
    n = sae.cfg.num_latents
    widths = sae.cfg.matryoshka_widths or [w for w in (n // 8, n // 4, n // 2) if w >= sae.cfg.k]
    return [w for w in widths if w < n] + [n]


def prefix_reconstructions(sae: SparseAutoencoder, codes: Codes) -> list[torch.Tensor]:
    """x̂ from the first m latents for each Matryoshka level m, from training's CSR codes
    (cumulative: each level adds only its own latents' pairs)."""
    n = len(codes.offsets)
    out, x_hat, start = [], sae.b_dec.expand(n, -1), 0
    for width in levels(sae):
        inside = (codes.indices >= start) & (codes.indices < width)
        x_hat = x_hat + sae.decode_sparse(codes.values * inside, codes.indices, codes.offsets)
        out.append(x_hat)
        start = width
    return out
