"""SAEBench's first-letter absorption, step by step on constructed cases: a latent that
absorbs a letter's direction on one word, and the pipeline that must find it."""

from __future__ import annotations

import numpy as np
import pytest

from sae_ray.method.absorption import (
    first_letter,
    first_letter_absorption,
    main_latents,
    token_absorption,
)

R2 = 2**-0.5
E = np.eye(8)
# decoder rows: 0 the letter's own latent, 1 "apple" (the letter and the word), 2 unrelated
W = np.stack([E[0], (E[0] + E[1]) * R2, E[2]])
PROBE = E[0]
COS = W @ PROBE


def test_a_fully_absorbed_token():
    """'apple' fires its own latent, which carries the whole probe projection; the main
    latent is silent: absorption fraction 1, full absorption."""
    x = E[0] + E[1]
    codes = np.array([0.0, 2**0.5, 0.0])
    got = token_absorption(x, codes, PROBE, COS, main=[0])
    assert got.fraction == 1.0 and got.full


def test_a_token_the_main_latent_carries():
    got = token_absorption(E[0], np.array([1.0, 0.0, 0.0]), PROBE, COS, main=[0])
    assert got.fraction == 0.0 and not got.full


def test_a_partly_absorbed_token():
    """Main and absorbing latent carry half each: fraction 0.5; not full (main fires)."""
    codes = np.array([0.5, 0.5 * 2**0.5, 0.0])
    got = token_absorption(E[0] + E[1], codes, PROBE, COS, main=[0])
    assert got.fraction == pytest.approx(0.5) and not got.full


def test_an_unaligned_latent_absorbs_nothing():
    """Below the 0.4 share (and 0.1 cosine) an other latent is no absorber."""
    codes = np.array([0.0, 0.0, 3.0])
    got = token_absorption(E[0] + E[2], codes, PROBE, COS, main=[0])
    assert got.fraction == 0.0 and not got.full


def _tokens(seed: int):
    """Three letters, each its own direction and main latent; 4 of letter A's 100 tokens
    are the word 'apple', coded by latent 3 (A's direction and the word's) instead."""
    rng = np.random.default_rng(seed)
    xs, codes, letters = [], [], []
    for i, letter in enumerate("ABC"):
        for j in range(100):
            apple = letter == "A" and j < 4
            x = E[i] + (E[5] if apple else 0) + rng.normal(0, 0.05, 8)
            c = np.zeros(6)
            c[3 if apple else i] = 2**0.5 if apple else 1.0
            xs.append(x)
            codes.append(c)
            letters.append(letter)
    return np.array(xs), np.array(codes), letters


def test_the_pipeline_finds_the_absorbing_latent():
    w_dec = np.stack([E[0], E[1], E[2], (E[0] + E[5]) * R2, E[6], E[7]])
    train, test = _tokens(0), _tokens(1)
    codes, letters = train[1], np.array(train[2])
    assert main_latents(codes, letters == "A", (test[1], np.array(test[2]) == "A")) == [0]
    out = first_letter_absorption(train, test, w_dec)
    assert out["letters"] == 3
    # A: 4 of its 100 test tokens wholly absorbed; B and C: none
    assert out["mean_fraction"] == pytest.approx(0.04 / 3, abs=1e-3)
    assert out["full_rate"] == pytest.approx(0.04 / 3, abs=1e-3)


def test_first_letter_reads_tokenizer_marks():
    words = ("Ġapple", "▁Bee", "cat", "##dog", " 42", "", "é")
    assert [first_letter(t) for t in words] == ["A", "B", "C", None, None, None, None]
