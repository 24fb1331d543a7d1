"""The sharpening strategies by name: which task runs which, which sharpen an SAE's codes,
and the one λ = 0 rule. Read by the schema and by the analysis section."""

from __future__ import annotations

from typing import Literal, get_args

CONTROL = "none"  # the λ = 0, equal-compute control strategy
Strategy = Literal[
    "per_class",
    "per_class_complement",
    "per_example",
    "centroid",
    "shuffled",
    "random",
    "none",
    "topk_sharp",
    "l1",
]
# Which strategies each task runs: the LM ones build their targets online, per token.
LM_ONLY = ("topk_sharp", "l1")
TASK_STRATEGIES = {
    "classification": tuple(s for s in get_args(Strategy) if s not in LM_ONLY),
    "causal_lm": (*LM_ONLY, "random", CONTROL),
}
# The strategies whose targets are an SAE's sharpened codes: what `shuffled` can permute.
SHUFFLABLE = ("per_class", "per_example")


def effective_strategy(strategy: str, aux_weight: float) -> str:
    """The one λ = 0 rule: with no aux term any strategy is the control (and shares its
    artifacts), so `none` and λ = 0 mean the same trial."""
    return CONTROL if aux_weight == 0 else strategy
