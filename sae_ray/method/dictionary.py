"""Label-free statistics of an SAE's dictionary over held-out tokens: how often each latent
fires (SAEBench's feature density, and the seed's firing Gini), beside its decoder's
geometry (`sae/decoder.py`)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sae_ray.method.evaluate import _batch_rows
from sae_ray.sae.decoder import decoder_silhouette, max_decoder_cos, mean_max_decoder_cos
from sae_ray.sae.model import SparseAutoencoder

DENSITY_BINS = np.arange(-6.0, 0.5, 0.5)  # log10 firing density; dead latents below


@torch.no_grad()
def firing_density(
    sae: SparseAutoencoder, tokens: Iterable[np.ndarray], device: torch.device | str = "cpu"
) -> np.ndarray:
    """Each latent's fraction of the token rows on which it fires (is positive)."""
    sae = sae.to(device).eval()
    counts = torch.zeros(sae.cfg.num_latents, dtype=torch.float64, device=device)
    n, rows = 0, _batch_rows(sae)
    for part in tokens:
        for start in range(0, len(part), rows):
            codes = sae.encode(torch.from_numpy(part[start : start + rows]).to(device))
            on = codes.values > 0
            counts.index_add_(
                0, codes.indices[on], torch.ones_like(codes.values[on], dtype=torch.float64)
            )
            n += len(codes.values)
    return (counts / max(n, 1)).cpu().numpy()


def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, → 1 when one holds
    everything (0 for all-zero input)."""
    v = np.sort(np.asarray(values, np.float64).ravel())
    if len(v) == 0 or v.sum() == 0:
        return 0.0
    cum = np.cumsum(v)
    return float((len(v) + 1 - 2 * cum.sum() / cum[-1]) / len(v))


def density_stats(density: np.ndarray) -> dict[str, Any]:
    """SAEBench's density fractions, a log10 histogram (JSON counts over DENSITY_BINS, dead
    latents in the first count) and the Gini of the firing frequencies (the seed's
    co-activation concentration: high when few latents do most of the firing)."""
    logs = np.log10(np.where(density > 0, density, 1e-12))
    hist = [int((density == 0).sum())] + np.histogram(logs[density > 0], DENSITY_BINS)[0].tolist()
    return {
        "density_above_1pct": float((density > 0.01).mean()),
        "density_above_10pct": float((density > 0.1).mean()),
        "log10_density_hist": json.dumps(hist),
        "firing_gini": gini(density),
    }


def feature_stats(
    sae: SparseAutoencoder, tokens: Iterable[np.ndarray], device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """`features/...`: the density statistics over held-out token rows and the decoder's."""
    out = density_stats(firing_density(sae, tokens, device))
    w = sae.W_dec.detach()
    out.update(
        max_decoder_cos=max_decoder_cos(w),
        mean_max_decoder_cos=mean_max_decoder_cos(w),
        decoder_silhouette=decoder_silhouette(w),
    )
    return {f"features/{k}": v for k, v in out.items()}
