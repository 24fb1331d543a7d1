"""Continued pre-training (`model.task: causal_lm`), the SAE-ception seed's LM mode:
`L = next-token CE + λ·aux` on every real token of packed blocks.

The aux term's target is built online from the current hooked output `h`:
- `topk_sharp`: `h` through the frozen SAE of the previous cycle, keeping each token's
  `k_sharp` strongest active latents, then decoded (no gradient into the SAE, nor through
  the target into `h`: it is a fixed point for this step);
- `random`: fixed, seeded random unit directions per block position, scaled to the norm of
  the token's own activation (a target with no SAE and no structure);
- `l1`: no target: `λ·‖h‖₁ / d` per token (the seed's L1 baseline, averaged over the
  dimensions as the MSE is: the seed's sum over d made it d times stronger at one λ);
- `none`: no aux term (λ = 0, equal compute).
`h` itself always keeps its graph: the aux gradient reaches the hooked block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sae_ray import storage
from sae_ray.config import CONTROL, Config
from sae_ray.method.seeds import stream
from sae_ray.sae.model import SparseAutoencoder


def next_token_ce(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token CE and its count, over positions that are real and whose next
    token is real (a padded tail scores nothing)."""
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    target = input_ids[:, 1:][valid]
    ce = F.cross_entropy(logits[:, :-1][valid].float(), target, reduction="sum")
    return ce, valid.sum()


@torch.no_grad()
def sharpened(sae: SparseAutoencoder, x: torch.Tensor, k_sharp: int | None) -> torch.Tensor:
    """Encode (TopK), keep each row's `k_sharp` largest active codes, decode. `None` (or
    k_sharp >= k) keeps every active latent: the SAE's own reconstruction."""
    codes = sae.encode(x.to(sae.b_dec.dtype))
    values, indices = codes.values, codes.indices
    if k_sharp is not None and k_sharp < values.shape[-1]:
        top = values.topk(k_sharp, dim=-1)
        values, indices = top.values, indices.gather(-1, top.indices)
    return sae.decode_sparse(values, indices) + sae.b_dec


def random_directions(seed: int, positions: int, d: int) -> torch.Tensor:
    """One fixed unit vector per block position, from the trial's seeded stream."""
    rng = np.random.default_rng(seed)
    r = rng.standard_normal((positions, d)).astype(np.float32)
    return torch.from_numpy(r / np.linalg.norm(r, axis=1, keepdims=True))


@dataclass
class LmAux:
    """The aux term of one CPT run; `sae` for topk_sharp, `directions` for random."""

    strategy: str
    weight: float
    loss: str = "mse"  # "mse" (the seed's) or "cosine"
    sae: SparseAutoencoder | None = None
    k_sharp: int | None = None
    directions: torch.Tensor | None = None

    @property
    def active(self) -> bool:
        return self.strategy != CONTROL and self.weight > 0

    def targets(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """The target of each real token's `h[keep]` (detached)."""
        x = h[keep].detach().float()
        if self.strategy == "topk_sharp":
            assert self.sae is not None, "topk_sharp needs the previous cycle's SAE"
            self.sae.to(x.device)
            return sharpened(self.sae, x, self.k_sharp).float()
        if self.strategy == "random":
            assert self.directions is not None
            positions = keep.nonzero()[:, 1]
            unit = self.directions.to(x.device)[positions % len(self.directions)]
            return unit * x.norm(dim=-1, keepdim=True)
        raise ValueError(f"sharpening.strategy: {self.strategy!r} has no target")

    def term(self, h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """aux over the real tokens (`keep`), with `h`'s graph."""
        x = h[keep].float()
        if self.strategy == "l1":  # per dimension, as the MSE: one λ means the same to both
            return x.abs().mean()
        t = self.targets(h, keep)
        if self.loss == "cosine":
            return (1 - F.cosine_similarity(x, t, dim=-1)).mean()
        return F.mse_loss(x, t)


def perplexity(ce_sum: float, tokens: float) -> float:
    """exp of the token-mean CE (nats), over the tokens scored."""
    return math.exp(ce_sum / max(tokens, 1.0))


def aux_spec(
    cfg: Config, strategy: str, seed: int, sae_at: str | None, cycle: int
) -> dict[str, Any] | None:
    """What a CPT retraining's aux term is (part of its model's key, with the SAE's
    location): its strategy and form, the frozen SAE it sharpens through (topk_sharp: the
    previous cycle's) and its kept count, or its random stream. None for the control."""
    if strategy == CONTROL:
        return None
    k_sharp = cfg.sharpening.kept(cfg.sae.k, 0) if strategy == "topk_sharp" else None
    return {
        "strategy": strategy,
        "loss": cfg.aux_loss,
        "sae": sae_at,
        "k_sharp": k_sharp,
        "seed": stream(seed, cycle, "random_targets") if strategy == "random" else None,
    }


def build_aux(spec: dict[str, Any] | None, weight: float, d: int, block: int) -> LmAux | None:
    """The aux term `aux_spec` describes, on this process (None: CPT without it)."""
    if spec is None:
        return None
    sae = None
    if spec.get("sae"):
        sae = SparseAutoencoder.load(storage.local_copy(spec["sae"])).requires_grad_(False)
    directions = random_directions(spec["seed"], block, d) if spec["strategy"] == "random" else None
    return LmAux(spec["strategy"], weight, spec["loss"], sae, spec["k_sharp"], directions)
