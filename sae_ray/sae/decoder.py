"""The geometry of SAE decoders: how a dictionary's rows sit (SAEBench's mean max decoder
cosine, the seed's decoder clustering) and how much of one dictionary another holds (the
seed's structure comparison of a strategy's SAE with its control's). Rows are
unit-normalised first: only directions count."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

SAMPLE = 4096  # decoder rows the O(rows²) statistics read: a seeded sample, fixed per seed


def _unit(w: torch.Tensor) -> torch.Tensor:
    return F.normalize(w.detach().float().cpu(), dim=-1)


def _sample(w: torch.Tensor, seed: int, size: int = SAMPLE) -> torch.Tensor:
    if len(w) <= size:
        return w
    gen = torch.Generator().manual_seed(seed)
    return w[torch.randperm(len(w), generator=gen)[:size]]


def row_max_cos(a: torch.Tensor, b: torch.Tensor, same: bool, chunk: int = 4096) -> torch.Tensor:
    """For each unit row of `a`, its largest cosine with a row of `b` (not itself where
    `same`: `a` is `b`), in chunks of `chunk` rows (no rows² matrix)."""
    out = []
    for start in range(0, len(a), chunk):
        sims = a[start : start + chunk] @ b.T
        if same:
            rows = torch.arange(len(sims))
            sims[rows, rows + start] = -1.0
        out.append(sims.max(1).values)
    return torch.cat(out)


def max_decoder_cos(w_dec: torch.Tensor) -> float:
    """max over pairs i ≠ j of cos(W_dec[i], W_dec[j])."""
    w = _unit(w_dec)
    return float(row_max_cos(w, w, same=True).max())


def mean_max_decoder_cos(w_dec: torch.Tensor, seed: int = 0) -> float:
    """SAEBench's `average_max_decoder_cosine_sim`: the mean over latents of each one's
    largest cosine with another latent (over a seeded sample of SAMPLE latents, each
    against all). High: latents duplicate, split or absorb one another's features."""
    w = _unit(w_dec)
    if len(w) <= SAMPLE:
        return float(row_max_cos(w, w, same=True).mean())
    gen = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(w), generator=gen)[:SAMPLE]
    sims = w[rows] @ w.T
    sims[torch.arange(len(rows)), rows] = -1.0
    return float(sims.max(1).values.mean())


def decoder_silhouette(w_dec: torch.Tensor, seed: int = 0) -> float:
    """The seed's decoder geometry: k-means (k = min(10, rows // 10 + 1)) over the unit
    decoder rows (a seeded sample of SAMPLE) and the silhouette of its clusters: high when
    the dictionary falls into tight groups of related directions."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    w = _sample(_unit(w_dec), seed).numpy()
    clusters = min(10, len(w) // 10 + 1)
    if clusters < 2:
        return 0.0
    labels = KMeans(n_clusters=clusters, n_init=3, random_state=seed).fit_predict(w)
    if len(np.unique(labels)) < 2:
        return 0.0
    return float(silhouette_score(w, labels))


def dictionary_overlap(w_a: torch.Tensor, w_b: torch.Tensor) -> float:
    """How much of dictionary A dictionary B holds: the mean over A's decoder rows of the
    largest cosine with one of B's (mean max cosine similarity; 1 when every direction of
    A is in B). Not symmetric when the widths differ."""
    return float(row_max_cos(_unit(w_a), _unit(w_b), same=False).mean())
