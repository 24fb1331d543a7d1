"""The sweep YAML's `search` section: the space (with conditional entries), the objectives,
the constraints, the searcher and the scheduler."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sae_ray.config.base import Section
from sae_ray.config.metrics import check_selectable


class SpaceEntry(Section):
    """One searched parameter. `when` makes it conditional: it is sampled only when every
    named parameter has (one of) the given value(s), e.g. top_k_pct only for strategies that
    use it; otherwise the trial keeps the YAML's value."""

    type: Literal["choice", "int", "intlog", "uniform", "loguniform"] = Field(
        description="the distribution (intlog: integers uniform in log scale)"
    )
    values: list[Any] | None = Field(None, description="choice: the values")
    low: float | None = Field(None, description="the lowest value (int, uniform, log)")
    high: float | None = Field(None, description="the highest value")
    step: int | None = Field(None, ge=1, description="int: the step between values")
    when: dict[str, Any] | None = Field(
        None, description="sampled only when these searched keys take (one of) these values"
    )

    @model_validator(mode="after")
    def _check(self) -> SpaceEntry:
        if self.type == "choice":
            if not self.values:
                raise ValueError("choice needs a non-empty 'values' list")
        elif self.low is None or self.high is None or self.low > self.high:
            raise ValueError(f"{self.type} needs 'low' <= 'high'")
        elif self.type in ("loguniform", "intlog") and self.low <= 0:
            raise ValueError(f"{self.type} needs 'low' > 0")
        elif self.type == "intlog" and self.step not in (None, 1):
            raise ValueError("intlog takes no 'step'")
        return self

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this entry can sample (for hand-given points)."""
        if self.type == "choice":
            return value in self.values
        if self.type in ("int", "intlog") and (isinstance(value, bool) or value != int(value)):
            return False
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def allows(self, params: dict[str, Any]) -> bool:
        """Whether this entry is active given the parameters sampled so far."""
        for dotted, wanted in (self.when or {}).items():
            options = wanted if isinstance(wanted, list) else [wanted]
            if params.get(dotted) not in options:
                return False
        return True


class Objective(Section):
    metric: str = Field(min_length=1, description="a reported metric, not a test/ one")

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        return check_selectable(value)

    mode: Literal["max", "min"] = Field("max", description="maximise or minimise it")
    at: Literal["last", "best"] = Field(
        "last", description="the last cycle's value, or the best cycle's"
    )

    @property
    def key(self) -> str:
        """The name the searcher reads: the metric itself, or its running best."""
        return self.metric if self.at == "last" else f"best/{self.metric}"

    def best(self, *values: float) -> float:
        """The best of `values` in this objective's direction (the one place `mode` is read
        for a running best, the best trial and the console's best so far)."""
        return max(values) if self.mode == "max" else min(values)


class Constraint(Section):
    """A feasibility bound on a metric at the last cycle: `min` / `max` absolute bounds, or
    `max_drop` below its cycle-0 value (accuracy may drop at most 0.005 = 0.5 points), or
    `max_rise_pct` above it in percent (the seed's tax check: perplexity may rise 2 %)."""

    metric: str = Field(min_length=1, description="the bounded metric, at the last cycle")
    min: float | None = Field(None, description="its lowest feasible value")

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        return check_selectable(value)

    max: float | None = Field(None, description="its highest feasible value")
    max_drop: float | None = Field(None, ge=0, description="how far below cycle 0 it may fall")
    max_rise_pct: float | None = Field(
        None, ge=0, description="how far above cycle 0 it may rise, in percent"
    )

    @model_validator(mode="after")
    def _one_bound(self) -> Constraint:
        bounds = (self.min, self.max, self.max_drop, self.max_rise_pct)
        if all(b is None for b in bounds):
            raise ValueError("a constraint needs 'min', 'max', 'max_drop' or 'max_rise_pct'")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is above max {self.max}: nothing is feasible")
        return self


class Search(Section):
    algorithm: Literal["tpe", "random", "grid", "nsga2"] = Field(
        "tpe", description="Optuna's sampler (grid: every combination of the choices)"
    )
    num_samples: int = Field(4, ge=1, description="trials (grid: ignored, one per point)")
    seeds: int = Field(
        1,
        ge=1,
        description="experiment seeds each point runs under (seed, seed+1, ...): a trial "
        "reports their mean, seeds.csv each one",
    )
    seeds_vary: Literal["experiment", "sae"] = Field(
        "experiment",
        description="what the seeds vary: the whole experiment (model, split, fine-tuning, "
        "SAE), or the SAE's initialisation alone (one model and one stream, each seed's SAE "
        "co-trained on it where the activations are shared): the spread that is the SAE's",
    )
    metric: str = Field("interp/u", description="the one objective (see objectives)")
    mode: Literal["max", "min"] = Field("max", description="maximise or minimise metric")

    @field_validator("metric")
    @classmethod
    def _reported(cls, value: str) -> str:
        return check_selectable(value)

    objectives: list[Objective] = Field(
        default_factory=list, description="several objectives: a Pareto front (overrides metric)"
    )
    constraints: list[Constraint] = Field(
        default_factory=list, description="feasibility bounds (infeasible trials are never best)"
    )
    scheduler: Literal["none", "asha"] = Field(
        "none", description="ASHA stops weak trials after a cycle (one objective only)"
    )
    grace_cycles: int = Field(1, ge=1, description="ASHA: cycles every trial runs")
    reduction_factor: float = Field(2.0, gt=1, description="ASHA: 1 / the share kept per rung")
    space: dict[str, SpaceEntry] = Field(
        default_factory=dict, description="dotted keys (sae.k, ...) -> their distribution"
    )
    points_to_evaluate: list[dict[str, Any]] = Field(
        default_factory=list, description="points run first, as given"
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="cap on trials at once (default: what the CPUs hold)"
    )
    control: bool = Field(
        True,
        description="run the λ = 0 control (strategy none) as the first trial, at the first "
        "point's other settings, beside the num_samples searched ones",
    )

    @field_validator("objectives")
    @classmethod
    def _distinct(cls, value: list[Objective]) -> list[Objective]:
        names = [o.metric for o in value]
        twice = next((n for n in names if names.count(n) > 1), None)
        if twice:
            raise ValueError(f"{twice!r} is listed twice")
        return value

    @model_validator(mode="after")
    def _check(self) -> Search:
        targets = self.goals()
        if self.scheduler == "asha" and len(targets) > 1:
            raise ValueError("asha stops trials on one objective; drop it or use one objective")
        if self.algorithm == "grid":
            for dotted, entry in self.space.items():
                if entry.type != "choice" and not (entry.type == "int" and entry.step):
                    raise ValueError(f"grid needs choice (or int with step) entries: {dotted}")
                if entry.when:  # Optuna's grid is the full product: skipped values repeat
                    raise ValueError(
                        f"grid runs every combination, so {dotted}'s `when` would run its "
                        "other points once per unused value; use tpe or random, or drop it"
                    )
        return self

    def goals(self) -> list[Objective]:
        """The objectives: the list, or the single metric/mode."""
        return self.objectives or [Objective(metric=self.metric, mode=self.mode)]
