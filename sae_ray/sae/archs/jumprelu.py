"""JumpReLU (Rajamanoharan et al. 2024): z = pre · H(pre − θ_j) with a learned θ per latent
(kept as its log). The threshold's gradient is the straight-through estimate of the paper
and SAELens (a rectangle kernel of bandwidth ε), and the loss adds `l0_coefficient · L0`
(the same estimate), or with `target_l0` T the quadratic `l0_coefficient · 2/T·(L0 − T)²`
per row (Gemma Scope 2, SAELens' quadratic mode). θ starts at 0.01 and ε is 0.05, SAELens
6.5x's defaults, both in units of the input's per-coordinate scale (SAELens' assume
normalised activations).

In training its codes are the pairs that fired and those inside the thresholds' window,
which decode as zeros but carry the loss's gradient to θ (the straight-through estimate
needs it there)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sae_ray.sae.archs.base import Architecture, register
from sae_ray.sae.codes import Codes, dense_codes, pairs_encode

BANDWIDTH = 0.05  # ε, x the input's per-coordinate scale (SAELens 6.5x's)
INIT_THRESHOLD = 0.01  # the initial θ, x the same scale (SAELens 6.5x's)


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


def _near_or_above(theta: torch.Tensor, eps: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pick: every pre-activation that fired or lies in the threshold's window (where
    the straight-through estimate gives θ a gradient); the rest carry none."""

    def select(pre: torch.Tensor) -> torch.Tensor:
        return (pre > (theta - eps / 2).to(pre.dtype)).flatten().nonzero().squeeze(1)

    return select


def l0_penalty(l0: torch.Tensor, target: float | None) -> torch.Tensor:
    """Σ over rows of L0 (DeepMind's JumpReLU), or with a target T of 2/T·(L0 − T)², Gemma
    Scope 2's quadratic penalty (SAELens' "quadratic" mode), which holds L0 near T instead
    of pushing it down at a rate the coefficient's units decide."""
    if target is None:
        return l0.sum()
    return (2 / target * (l0 - target).pow(2)).sum()


@register
class JumpReLUArchitecture(Architecture):
    name = "jumprelu"
    uses_target_l0 = True

    def add_parameters(self, sae):
        sae.log_threshold = nn.Parameter(torch.zeros(sae.cfg.num_latents))
        sae.register_buffer("input_scale", torch.ones(()))

    @torch.no_grad()
    def init_from_data(self, sae, x):
        """θ at a fixed fraction of the input's scale or, with a target L0 T, where this
        batch's mean L0 is T (BatchTopK's first-batch threshold): Adam moves a log-threshold
        by about lr a step, too slowly to find T from afar."""
        scale = (x - x.mean(0)).pow(2).mean().sqrt().clamp_min(1e-6)
        sae.input_scale.copy_(scale)
        theta = INIT_THRESHOLD * float(scale)
        if sae.cfg.target_l0 is not None:
            w = sae.encoder.weight.float()
            pre = F.linear(sae.centred(x).float(), w, sae.encoder.bias.float()).flatten()
            on = min(max(1, round(sae.cfg.target_l0 * len(x))), len(pre))
            theta = max(float(pre.topk(on).values[-1]), theta)
        sae.log_threshold.data.fill_(math.log(theta))

    def encode(self, sae, x, dead):
        theta = sae.log_threshold.exp()
        if not sae.training:
            pre = F.linear(sae.centred(x), sae.encoder.weight, sae.encoder.bias)
            return dense_codes(pre * (pre > theta), sae.cfg.k)
        eps = BANDWIDTH * float(sae.input_scale)
        pre, rows, cols, offsets, aux_values, aux_indices = pairs_encode(
            sae, x, dead, _near_or_above(theta.detach(), eps)
        )
        theta_at = theta[cols]
        values = JumpReLU.apply(pre, theta_at, eps)
        fired = Step.apply(pre, theta_at, eps)
        l0 = torch.zeros(len(x), dtype=fired.dtype, device=x.device).index_add(0, rows, fired)
        penalty = l0_penalty(l0, sae.cfg.target_l0)
        return Codes(values, cols, aux_values, aux_indices, penalty=penalty, offsets=offsets)

    def fold_scale(self, sae, scale):
        sae.log_threshold -= math.log(scale)

    def saelens(self, sae):
        return {}, {"threshold": sae.log_threshold.exp()}
