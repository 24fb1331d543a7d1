"""SAEBench's first-letter feature absorption (`sae_bench/evals/absorption`), on token
activations.

A linear probe per letter reads "this token starts with L" from the model's activations.
The SAE's main latents for L are found by k-sparse probing: latents ranked by how much
more they fire on L-tokens, k grown from 1 while the k-sparse probe's F1 rises by more
than 0.03 (SAEBench's feature-splitting rule). On each held-out L-token the probe calls
L, the absorption fraction is the share of the probe's projection carried by up to 3
other latents aligned with the probe (cosine ≥ 0.1) rather than by the main latents, and
the token is fully absorbed when no main latent fires and a single other, aligned latent
carries ≥ 40 % of it (SAEBench's thresholds, its `FeatureAbsorptionCalculator`).

Differences from SAEBench: it prompts "{word} has the first letter:" in context and ranks
latents with an L1-penalised probe; here the tokens are those of the evaluation text, the
ranking is by class-mean difference, and the letter probes are one-vs-rest logistic
regressions. The metric means something only for a trained model and a real tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sae_ray.sae.model import SparseAutoencoder

EPS = 1e-8
SPLIT_F1_JUMP = 0.03  # a k-sparse probe's F1 gain that counts as feature splitting
FRACTION_PROBE_COS = 0.1  # an absorbing latent's cosine with the probe, at least
FULL_PROBE_COS = 0.025  # the top latent's cosine with the probe, for full absorption
PROJECTION_SHARE = 0.4  # of the probe projection the absorbing latent(s) must carry
MAX_ABSORBING = 3
MAX_K = 5
MIN_TOKENS = 10  # of a letter, on train and on test, for it to be evaluated


def first_letter(text: str) -> str | None:
    """A word-initial token's first letter, upper-cased, past BPE / SentencePiece space
    marks; None when it does not start with a letter or continues a word."""
    if text.startswith("##"):  # WordPiece: the middle of a word
        return None
    clean = text.replace("Ġ", "").replace("▁", "").strip()
    return clean[0].upper() if clean and clean[0].isascii() and clean[0].isalpha() else None


@dataclass
class TokenAbsorption:
    fraction: float
    full: bool


def token_absorption(
    x: np.ndarray, codes: np.ndarray, probe: np.ndarray, cos: np.ndarray, main: list[int]
) -> TokenAbsorption:
    """One token's absorption (SAEBench's `calculate_absorption` for one word): `x` its
    activation, `codes` its SAE codes (dense), `probe` the letter probe's unit direction,
    `cos` each decoder row's cosine with the probe, `main` the letter's main latents."""
    total = float(x @ probe)
    projections = codes * cos
    main_proj = float(projections[main].sum())
    others = np.ones(len(codes), bool)
    others[main] = False
    others &= (cos >= FRACTION_PROBE_COS) & (projections > 0)
    absorbing = np.sort(projections[others])[::-1][:MAX_ABSORBING].sum()
    if main_proj >= total or absorbing / total < PROJECTION_SHARE:
        fraction = 0.0
    elif main_proj <= 0.0:
        fraction = 1.0
    else:
        absorbed = min(absorbing, total - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    top = int(np.argmax(projections))
    full = (
        bool(np.all(codes[main] < EPS))
        and cos[top] >= FULL_PROBE_COS
        and total >= 0
        and projections[top] / total >= PROJECTION_SHARE
    )
    return TokenAbsorption(fraction, full)


def main_latents(codes: np.ndarray, is_letter: np.ndarray, test, max_k: int = MAX_K):
    """The letter's main latents: the top-k by mean difference, k grown while the k-sparse
    probe's F1 on `test` (codes, is_letter) rises by more than SPLIT_F1_JUMP."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import f1_score

    diff = codes[is_letter].mean(0) - codes[~is_letter].mean(0)
    ranking = np.argsort(-diff, kind="stable")
    chosen, best = [], -np.inf
    for k in range(1, max_k + 1):
        ids = ranking[:k].tolist()
        probe = LogisticRegression(max_iter=500, class_weight="balanced")
        probe.fit(codes[:, ids], is_letter)
        score = f1_score(test[1], probe.predict(test[0][:, ids]), zero_division=0.0)
        if score <= best + SPLIT_F1_JUMP:
            break
        chosen, best = ids, score
    return chosen


def first_letter_absorption(
    train: tuple[np.ndarray, np.ndarray, list[str | None]],
    test: tuple[np.ndarray, np.ndarray, list[str | None]],
    w_dec: np.ndarray,
) -> dict[str, float]:
    """`mean_fraction` (mean over letters of the tokens' absorption fraction),
    `full_rate` (mean over letters of the share fully absorbed) and `letters` (how many
    had MIN_TOKENS on both splits). `train` and `test`: (activations, dense SAE codes,
    each token's first letter or None); `w_dec`: (latents, d)."""
    from sklearn.linear_model import LogisticRegression

    unit = w_dec / np.maximum(np.linalg.norm(w_dec, axis=1, keepdims=True), EPS)
    (x_tr, c_tr, l_tr), (x_te, c_te, l_te) = train, test
    l_tr, l_te = np.asarray(l_tr, dtype=object), np.asarray(l_te, dtype=object)
    fractions, fulls = [], []
    for letter in sorted({v for v in l_tr if v is not None}):
        y_tr, y_te = l_tr == letter, l_te == letter
        if min(y_tr.sum(), (~y_tr).sum(), y_te.sum()) < MIN_TOKENS:
            continue
        probe = LogisticRegression(max_iter=1000, class_weight="balanced").fit(x_tr, y_tr)
        direction = probe.coef_[0] / max(np.linalg.norm(probe.coef_[0]), EPS)
        main = main_latents(c_tr, y_tr, (c_te, y_te))
        called = np.flatnonzero(y_te & (probe.decision_function(x_te) > 0))
        if not main or len(called) == 0:
            continue
        cos = unit @ direction
        scores = [token_absorption(x_te[i], c_te[i], direction, cos, main) for i in called]
        fractions.append(np.mean([s.fraction for s in scores]))
        fulls.append(np.mean([s.full for s in scores]))
    if not fractions:
        return {"letters": 0.0}
    return {
        "mean_fraction": float(np.mean(fractions)),
        "full_rate": float(np.mean(fulls)),
        "letters": float(len(fractions)),
    }


DENSE_ELEMENTS = 1 << 26  # tokens x latents of the dense codes it reads (256 MB float32)
MAX_TOKENS = 16384  # and at most this many tokens: 26 letter probes fit on half of them


def absorption_on_tokens(
    sae: SparseAutoencoder, root: Path, column: str, tokenizer, device="cpu"
) -> dict[str, float]:
    """`first_letter_absorption` on a token table (rows with their `token_id`), its first
    MAX_TOKENS rows (fewer where their dense codes would pass DENSE_ELEMENTS), in halves:
    the probes and main latents fitted on the first, scored on the second. NaN where no
    letter had enough tokens."""
    from sae_ray.lm.extraction import load_token_ids, load_tokens
    from sae_ray.method.evaluate import active_codes

    limit = max(2 * MIN_TOKENS, min(MAX_TOKENS, DENSE_ELEMENTS // sae.cfg.num_latents))
    x = load_tokens(root, column, limit)
    words = tokenizer.convert_ids_to_tokens(load_token_ids(root, len(x)).tolist())
    letters = [first_letter(w) for w in words]
    values, indices = active_codes(sae, x, device)
    codes = np.zeros((len(x), sae.cfg.num_latents), np.float32)
    rows = np.repeat(np.arange(len(x)), indices.shape[1])
    np.add.at(codes, (rows, indices.ravel()), np.maximum(values, 0.0).ravel())  # pads add 0
    half = len(x) // 2
    w_dec = sae.W_dec.detach().float().cpu().numpy()
    out = first_letter_absorption(
        (x[:half], codes[:half], letters[:half]), (x[half:], codes[half:], letters[half:]), w_dec
    )
    return {"mean_fraction": np.nan, "full_rate": np.nan, **out}
