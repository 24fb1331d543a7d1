"""The sweep YAML's `sharpening` section: how each cycle's targets are built, and the
checks that a setting sharpens anything at all."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from sae_ray.config.base import Section
from sae_ray.config.strategies import Strategy

DEFAULT_KEEP_FRAC = 0.5


class Sharpening(Section):
    """How each cycle's targets are built. `per_class` / `per_example` keep `keep_frac` of
    the latents active in each example's code (its k); `top_k_pct` instead keeps that
    percentage of the whole dictionary (the seed repo's rule, which keeps every active
    latent whenever it reaches k). `centroid`, `shuffled`, `random` and `none` are controls:
    label supervision without an SAE, sharpened targets without their pairing, any target
    at all, and λ = 0."""

    strategy: Strategy = Field(
        "per_class",
        description="how targets are built: per_class, per_class_complement, per_example "
        "(from the SAE's codes); centroid, shuffled, random, none (controls); topk_sharp, "
        "l1 (causal_lm, online)",
    )
    keep_frac: float | None = Field(
        None, gt=0, le=1, description="latents kept: this fraction of each example's k (0.5)"
    )
    top_k_pct: float | None = Field(
        None, gt=0, le=100, description="the seed's rule instead: this % of all latents"
    )
    shuffle_of: Literal["per_class", "per_example"] | None = Field(
        None,
        description="shuffled: whose targets are permuted across examples (default: the "
        "primary contrast's strategy when it sharpens SAE codes, else per_class), so "
        "X − shuffled compares X with its own targets unpaired",
    )
    k_sharp: int | None = Field(
        None,
        ge=1,
        description="topk_sharp: active latents each token's online target keeps "
        "(default keep_frac of k)",
    )

    @model_validator(mode="after")
    def _one_rule(self) -> Sharpening:
        if self.top_k_pct is not None and self.keep_frac is not None:
            raise ValueError("keep_frac and top_k_pct are two rules for one count: set one")
        return self

    @property
    def rule(self) -> str:
        """The field that sets the kept count (named by refusals)."""
        if self.strategy == "topk_sharp":
            return "sharpening.k_sharp" if self.k_sharp is not None else "sharpening.keep_frac"
        return "sharpening.top_k_pct" if self.top_k_pct is not None else "sharpening.keep_frac"

    def kept(self, k: int, num_latents: int) -> int:
        """Latents a sharpened target keeps: of each code's k (per_example, topk_sharp), or
        of the class's mean code (per_class)."""
        if self.strategy == "topk_sharp":  # per token, of its k active latents
            return self.k_sharp or max(1, int((self.keep_frac or DEFAULT_KEEP_FRAC) * k))
        if self.top_k_pct is not None:
            return max(1, math.ceil(num_latents * self.top_k_pct / 100))
        return max(1, int((self.keep_frac or DEFAULT_KEEP_FRAC) * k))

    def check_changes_targets(self, k: int, num_latents: int) -> None:
        """A setting that provably leaves every target equal to the SAE's reconstruction
        (or empty) would run a sweep that sharpens nothing: a ValueError naming the field."""
        keep, strategy = self.kept(k, num_latents), self.strategy
        if strategy in ("per_example", "topk_sharp") and keep >= k:
            raise ValueError(
                f"{self.rule}: keeps {keep} latents of k={k}, so {strategy} targets equal "
                "the SAE's own reconstruction (sharpening changes nothing)"
            )
        if strategy in ("per_class", "per_class_complement") and keep >= num_latents:
            raise ValueError(
                f"{self.rule}: keeps {keep} latents of the {num_latents} in the dictionary, "
                f"so {strategy} targets are the reconstruction (or nothing)"
            )
