"""Matryoshka (Bussmann et al. 2025, dictionary_learning): BatchTopK's codes, and the loss is
the mean over nested prefixes (widths m₁ < m₂ < ... < latents) of the squared error of the
reconstruction from the first mᵢ latents alone."""

from __future__ import annotations

import torch

from sae_ray.sae.archs.base import register
from sae_ray.sae.archs.batchtopk import BatchTopK
from sae_ray.sae.codes import Codes


def levels(sae) -> list[int]:
    """The prefix widths, the whole dictionary last (default: n/8, n/4, n/2 of at least k)."""
    n = sae.cfg.num_latents
    widths = sae.cfg.matryoshka_widths or [w for w in (n // 8, n // 4, n // 2) if w >= sae.cfg.k]
    return [w for w in widths if w < n] + [n]


def prefix_reconstructions(sae, codes: Codes) -> list[torch.Tensor]:
    """x̂ from the first m latents for each level m, from training's CSR codes (cumulative:
    each level adds only its own latents' pairs)."""
    n = len(codes.offsets)
    out, x_hat, start = [], sae.b_dec.expand(n, -1), 0
    for width in levels(sae):
        inside = (codes.indices >= start) & (codes.indices < width)
        x_hat = x_hat + sae.decode_sparse(codes.values * inside, codes.indices, codes.offsets)
        out.append(x_hat)
        start = width
    return out


@register
class Matryoshka(BatchTopK):
    name = "matryoshka"

    def squared_error(self, sae, x, x_hat, codes):
        if codes.offsets is None:  # inference codes: the whole dictionary's
            return super().squared_error(sae, x, x_hat, codes)
        parts = prefix_reconstructions(sae, codes)
        return torch.stack([(x - x_m).pow(2).sum() for x_m in parts]).mean()
