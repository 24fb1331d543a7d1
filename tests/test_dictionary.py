"""The dictionary's statistics on hand cases: density, Gini, decoder cosines, clustering,
and the overlap of two dictionaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sae_ray.method.dictionary import density_stats, firing_density, gini
from sae_ray.sae.decoder import (
    decoder_silhouette,
    dictionary_overlap,
    max_decoder_cos,
    mean_max_decoder_cos,
)
from sae_ray.sae.model import SaeConfig, SparseAutoencoder


def test_density_on_a_hand_case():
    """An identity-like SAE with k = 1: each token fires the latent of its largest input."""
    sae = SparseAutoencoder(SaeConfig(d_in=4, num_latents=4, k=1))
    with torch.no_grad():
        sae.encoder.weight.copy_(torch.eye(4))  # pre-activation = the input
        sae.encoder.bias.zero_()
        sae.b_dec.zero_()
    x = np.zeros((100, 4), np.float32)
    x[:50, 0] = 1  # latent 0 on half the tokens
    x[50:99, 1] = 1  # latent 1 on 49
    x[99, 2] = 1  # latent 2 on one; latent 3 never
    density = firing_density(sae, [x[:30], x[30:]])
    assert density.tolist() == pytest.approx([0.5, 0.49, 0.01, 0.0])
    stats = density_stats(density)
    assert stats["density_above_1pct"] == 0.5  # 0.01 is not above 1 %
    assert stats["density_above_10pct"] == 0.5
    hist = json.loads(stats["log10_density_hist"])
    assert hist[0] == 1 and sum(hist) == 4  # one dead latent, every latent counted once
    assert hist[-1] == 2  # 0.5 and 0.49: log10 in [-0.5, 0)


def test_gini():
    assert gini(np.ones(10)) == pytest.approx(0.0)
    assert gini(np.zeros(10)) == 0.0
    one = np.zeros(10)
    one[3] = 1.0
    assert gini(one) == pytest.approx(0.9)  # (n - 1) / n: one holds everything
    assert gini(np.array([1.0, 3.0])) == pytest.approx(0.25)  # mean abs difference / (2·mean)


def test_decoder_cosines():
    eye = torch.eye(8)
    assert max_decoder_cos(eye) == pytest.approx(0.0)
    assert mean_max_decoder_cos(eye) == pytest.approx(0.0)
    rows = torch.cat([eye, eye[:2] * 3])  # two duplicated directions (scale ignored)
    assert max_decoder_cos(rows) == pytest.approx(1.0)
    assert mean_max_decoder_cos(rows) == pytest.approx(4 / 10)  # 4 of 10 rows have a twin


def test_dictionary_overlap():
    eye = torch.eye(6)
    assert dictionary_overlap(eye, eye.flip(0)) == pytest.approx(1.0)  # same directions
    assert dictionary_overlap(eye[:3], eye[3:]) == pytest.approx(0.0)  # none shared
    half = torch.cat([eye[:3], eye[3:] + eye[:3]])  # 3 kept, 3 rotated 45° towards them
    assert dictionary_overlap(eye, half) == pytest.approx((3 + 3 * 2**-0.5) / 6)


def test_decoder_silhouette_sees_groups():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(16)[:10]
    grouped = centres.repeat_interleave(20, 0) + 0.05 * torch.randn(200, 16, generator=gen)
    scattered = torch.randn(200, 16, generator=gen)
    assert decoder_silhouette(grouped) > 0.8 > 0.2 > decoder_silhouette(scattered)
