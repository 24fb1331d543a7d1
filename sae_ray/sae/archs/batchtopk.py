"""BatchTopK (Bussmann et al. 2024): in training the batch's `k x rows` largest ReLU
pre-activations, over all rows together; a threshold θ follows, as an exponential moving
average (rate 0.01, SAELens' `topk_threshold_lr`; the first batch sets it, as in
dictionary_learning), the smallest selected activation. At inference a latent fires where
its pre-activation exceeds θ (a JumpReLU with one θ), which is how SAELens saves it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from sae_ray.distributed.ranks import all_reduce
from sae_ray.sae.archs.base import Architecture, register
from sae_ray.sae.codes import Codes, dense_codes, pairs_encode

THRESHOLD_LR = 0.01  # SAELens' topk_threshold_lr
CANDIDATES = 4  # the pick looks first among each row's CANDIDATES x k largest


def _batch_top(k: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The pick: the `k x rows` largest of the whole batch.

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


@torch.no_grad()
def update_threshold(sae, z: torch.Tensor) -> None:
    """θ ← (1 − rate)·θ + rate·(smallest positive selected activation, over all workers)."""
    positive = z[z > 0]
    low = positive.min().double() if len(positive) else torch.tensor(torch.inf).to(z.device)
    low = all_reduce(low.reshape(1).clone(), torch.distributed.ReduceOp.MIN)[0]
    if torch.isfinite(low):
        theta = sae.threshold
        if theta == 0:  # the first batch sets it (dictionary_learning's start): no warm-up
            theta.copy_(low)
        else:
            theta.copy_((1 - THRESHOLD_LR) * theta + THRESHOLD_LR * low.to(theta))


@register
class BatchTopK(Architecture):
    name = "batchtopk"

    def add_parameters(self, sae):
        sae.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def encode(self, sae, x, dead):
        if not sae.training:
            pre = F.linear(sae.centred(x), sae.encoder.weight, sae.encoder.bias)
            return dense_codes(pre.relu() * (pre > sae.threshold.to(pre.dtype)), sae.cfg.k)
        pre, _, cols, offsets, aux_values, aux_indices = pairs_encode(
            sae, x, dead, _batch_top(sae.cfg.k)
        )
        values = pre.relu()
        update_threshold(sae, values.detach())
        return Codes(values, cols, aux_values, aux_indices, offsets=offsets)

    def fold_scale(self, sae, scale):
        sae.threshold /= scale

    def saelens(self, sae):
        return (
            {},
            {"threshold": torch.full_like(sae.encoder.bias, float(sae.threshold))},
        )
