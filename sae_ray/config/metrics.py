"""The metrics a trial reports each cycle (results.csv's metric columns), by name: what an
objective or a constraint may name. A typo there would otherwise run a whole sweep that
optimises nothing. `tests/test_ray_e2e.py` checks this list against a real sweep's columns."""

from __future__ import annotations

import difflib
import re

TASK = [f"{split}/{m}" for split in ("val", "test") for m in ("accuracy", "f1_macro")]
# model.task: causal_lm's (the change is against the seed's cycle-0 model, in percent)
LM = ["val/perplexity", "test/perplexity", "perplexity_change_pct", "test/perplexity_change_pct"]
LM_SAE = [
    "spliced_ce",
    "spliced_kl",
    "clean_ce",
    "zero_ablation_ce",
    "ce_loss_score",
    "sharp_perplexity",
]
FEATURES = ["density_above_1pct", "density_above_10pct", "max_decoder_cos"]
INTERP = [
    "u",
    "u_null",
    "u_excess",
    "u_top",
    "u_top_null",
    "u_top_excess",
    "alive_frac",
    "csi",
    "ari",
    "silhouette",
    "davies_bouldin",
    "calinski_harabasz",
    "probe_accuracy",
]
SPARSE_PROBES = (1, 5, 25)
SAE = [
    "fvu",
    "explained_variance",
    "l0",
    "dead_pct",
    "absorption",
    "train_tokens_per_s",
    "steps_to_fvu",
]
FINETUNE = ["steps", "best_epoch", "ce", "aux"]
STAGES = ["model", "activations", "sae", "evaluate", "targets"]
TARGETS = ["kept_latents", "recon_cos", "initial_aux"]
# Reported beside each trial's own value for the λ = 0 model of its seed and cycle, through
# an SAE of the trial's settings: `control/<metric>` and `delta/<metric>` (own - control).
PAIRED_TASK = {
    False: [
        "interp/u",
        "interp/u_excess",
        "interp/u_top_excess",
        "test/interp/u",
        "test/interp/u_excess",
        "test/interp/u_top_excess",
        "val/accuracy",
        "test/accuracy",
    ],
    True: ["val/perplexity", "test/perplexity", "sae/ce_loss_score"],
}
PAIRED = [*PAIRED_TASK[False], *PAIRED_TASK[True], "sae/fvu"]


def task_metrics(lm: bool) -> list[str]:
    """The model's own quality, validation then held-out test: what the trade-off is
    against (accuracy for a classifier, perplexity for a causal LM)."""
    return LM[:2] if lm else ["val/accuracy", "test/accuracy"]


def headline(lm: bool) -> list[str]:
    """The console's and the report's columns beside the objective."""
    if lm:
        return [*LM[:3], "sae/fvu", "sae/ce_loss_score", "sae/l0", "sae/dead_pct"]
    return [*task_metrics(False), "interp/u", "sae/fvu", "sae/l0", "sae/dead_pct"]


def known_metrics(lm: bool | None = None) -> list[str]:
    """Every metric name a cycle reports (the sparse probes at their default k): of a
    classification sweep, of a causal LM sweep (`lm`), or (None) of either."""
    if lm is None:
        return list(dict.fromkeys(known_metrics(False) + known_metrics(True)))
    names = [*LM, *(f"sae/{m}" for m in LM_SAE), *(f"features/{m}" for m in FEATURES)]
    if not lm:
        names = list(TASK)
        for head in ("", "test/"):
            for kind in ("interp", "base"):
                names += [f"{head}{kind}/{m}" for m in INTERP]
            names += [f"{head}interp/sparse_probe_accuracy@{k}" for k in SPARSE_PROBES]
        names += [f"targets/{m}" for m in TARGETS]
    names += [f"sae/{m}" for m in SAE]
    names += [f"finetune/{m}" for m in FINETUNE]
    paired = [*PAIRED_TASK[lm], "sae/fvu"]
    names += [f"{head}/{m}" for head in ("control", "delta") for m in paired]
    stages = [s for s in STAGES if not (lm and s == "targets")]  # LM targets are online
    names += [f"time/{s}_s" for s in stages] + ["artifacts/computed", "memory/worker_peak_mb"]
    return names


_SPARSE = re.compile(r"^(test/)?interp/sparse_probe_accuracy@\d+$")


def check_metric(name: str) -> str:
    """`name` if a trial reports it; else a ValueError that suggests the nearest names."""
    if name in known_metrics() or _SPARSE.match(name):
        return name
    near = difflib.get_close_matches(name, known_metrics(), n=3)
    hint = f"; did you mean {' or '.join(near)}?" if near else " (see docs/outputs.md)"
    raise ValueError(f"{name!r} is not a metric a trial reports{hint}")


def check_selectable(name: str) -> str:
    """A metric a sweep may select on: reported, and not measured on the held-out test
    split (choosing by it would make the test split a second validation split)."""
    check_metric(name)
    head, _, rest = name.partition("test/")
    if not _ or head not in ("", "delta/", "control/"):
        return name
    twin = f"{head}{'val/' if rest in ('accuracy', 'f1_macro', 'perplexity') else ''}{rest}"
    raise ValueError(
        f"{name!r} is measured on the held-out test split, which selection must never see; "
        f"select on {twin!r}"
    )
