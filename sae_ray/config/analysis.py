"""The sweep YAML's `analysis` section: what comparison.csv tests, declared before the run.

One primary contrast (a strategy against the control or another strategy, on one metric,
at one cycle) is reported unadjusted; every other row of comparison.csv is secondary and
Holm-adjusted as one family. Secondary contrasts between strategies separate "the SAE's
structure helps" from "labels help": per_class − centroid (label supervision without an
SAE) and X − shuffled (X's own targets, their pairing with the examples broken)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from sae_ray.config.base import Section
from sae_ray.config.metrics import PAIRED, check_metric
from sae_ray.config.strategies import CONTROL, Strategy


class Contrast(Section):
    """`strategy` minus `against`, each seed's points averaged first, paired by seed."""

    strategy: Strategy = Field(description="the strategy tested")
    against: Strategy = Field(CONTROL, description="the other side (default: the λ = 0 control)")

    @model_validator(mode="after")
    def _two_sides(self) -> Contrast:
        if self.strategy == self.against:
            raise ValueError(f"against: {self.strategy} against itself compares nothing")
        return self


class Primary(Contrast):
    """The one contrast the sweep is run to test, reported without adjustment."""

    metric: str = Field(description="a paired metric (one with a delta/ column)")
    cycle: int | Literal["last"] = Field("last", description="the cycle compared")

    @field_validator("metric")
    @classmethod
    def _paired(cls, value: str) -> str:
        check_metric(value)
        if value not in PAIRED:
            raise ValueError(f"{value!r} has no paired difference; one of {', '.join(PAIRED)}")
        return value

    @field_validator("cycle")
    @classmethod
    def _not_negative(cls, value: int | str) -> int | str:
        if isinstance(value, int) and value < 0:
            raise ValueError("must be at least 0 (or last)")
        return value


class Analysis(Section):
    primary: Primary | None = Field(
        None, description="the contrast declared before the run, reported unadjusted"
    )
    contrasts: list[Contrast] | None = Field(
        None,
        description="secondary contrasts between strategies (Holm with the rest); default: "
        "per_class − centroid and X − shuffled, for the strategies the sweep runs",
    )
    alpha: float = Field(0.05, gt=0, lt=0.5, description="two-sided level of every test")
    power: float = Field(
        0.8, gt=0, lt=1, description="the power at which each row's minimum detectable effect is"
    )
