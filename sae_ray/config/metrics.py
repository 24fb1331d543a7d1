"""The metrics a trial reports each cycle (results.csv's metric columns), by name: what an
objective or a constraint may name. A typo there would otherwise run a whole sweep that
optimises nothing. `tests/test_ray_e2e.py` checks this list against a real sweep's columns."""

from __future__ import annotations

import difflib
import re

# Each family's metrics and what they mean (`python -m sae_ray.config.glossary` writes
# docs/metrics.md from these; a metric without a meaning fails its test).
TASK = {
    "accuracy": "the classifier's accuracy",
    "f1_macro": "the classifier's F1, macro-averaged over the classes",
}
# model.task: causal_lm's (the change is against the seed's cycle-0 model, in percent)
LM = {
    "val/perplexity": "the causal LM's perplexity on validation blocks",
    "test/perplexity": "the same on the held-out test blocks",
    "perplexity_change_pct": "validation perplexity's rise over the seed's cycle-0 model, %",
    "test/perplexity_change_pct": "the same on test",
}
LM_SAE = {
    "spliced_ce": "next-token CE with the hooked layer replaced by the SAE's reconstruction",
    "spliced_kl": "KL from the clean model's next-token distribution to the spliced one's",
    "clean_ce": "next-token CE of the model as it is",
    "zero_ablation_ce": "next-token CE with the hooked layer's output zeroed",
    "ce_loss_score": "(zero-ablation CE - spliced CE) / (zero-ablation CE - clean CE): 1 is "
    "a perfect splice",
    "sharp_perplexity": "perplexity with the layer replaced by the reconstruction sharpened "
    "to the trial's k_sharp",
}
FEATURES = {
    "density_above_1pct": "SAEBench: fraction of latents that fire on more than 1 % of tokens",
    "density_above_10pct": "SAEBench: fraction of latents that fire on more than 10 % of tokens",
    "log10_density_hist": "counts of latents by log10 firing density (JSON: dead latents, then "
    "half-decade bins from 1e-6 to 1): the report's density histogram",
    "firing_gini": "the seed's co-activation concentration: Gini of the latents' firing "
    "frequencies (0: all fire equally often; near 1: a few do all the firing)",
    "max_decoder_cos": "the largest cosine between two distinct decoder rows",
    "mean_max_decoder_cos": "SAEBench's average max decoder cosine: each latent's largest "
    "cosine with another, averaged (high: latents duplicate or absorb each other)",
    "decoder_silhouette": "the seed's decoder geometry: silhouette of k-means (k = 10) over "
    "the unit decoder rows (high: the dictionary falls into tight groups)",
}
NOT_METRICS = {"log10_density_hist"}  # a JSON string in results.csv, not a number
# SAEBench's sparse probing, one-vs-rest per class at the pooled position, mean over classes
SAEBENCH_KS = (1, 2, 5)
SAEBENCH = {
    "sae_top_{k}_accuracy": "a logistic probe on the k latents whose class means differ most "
    "on train (SAEBench's sparse probing, k = 1, 2, 5), mean accuracy over classes",
    "llm_top_{k}_accuracy": "the same on the k dimensions of the model's own activations",
}
# SAEBench's first-letter absorption on the validation tokens (method/absorption.py)
ABSORPTION = {
    "mean_fraction": "SAEBench's absorption: the share of a letter probe's projection that "
    "latents other than the letter's main ones carry, mean over tokens, then letters "
    "(meaningful only for a trained model with a real tokenizer; NaN with too few letters)",
    "full_rate": "the share of a letter's tokens fully absorbed (no main latent fires; one "
    "other latent carries at least 40 %), mean over letters",
    "letters": "letters with enough tokens to be evaluated",
}
# A ground-truth sweep's (dataset.name synthetic:synthsae): SAELens's eval_sae_on_synthetic_data
GROUND_TRUTH = {
    "mcc": "mean correlation coefficient: the mean |cosine| of decoder rows and true features "
    "matched one-to-one (Hungarian), 1 = every true feature found",
    "f1": "each latent as a detector of its best-matching true feature: F1, mean over latents",
    "precision": "of the draws a latent fires on, the share with its feature active, mean",
    "recall": "of the draws with a latent's feature active, the share it fires on, mean",
    "uniqueness": "share of latents tracking a true feature no other latent tracks",
    "explained_variance": "R² of the reconstruction on fresh draws",
    "l0": "active latents per draw",
    "true_l0": "active true features per draw (the world's own L0)",
    "dead_latents": "latents that never fire on the evaluation draws",
    "shrinkage": "mean ‖x̂‖ / ‖x‖ (below 1: the SAE shrinks)",
}
# The seed's structure comparison: each strategy's SAE against its paired control's
OVERLAP = "structure/dict_overlap"
STRUCTURE = {
    "dict_overlap": "mean over the control SAE's decoder rows of the largest cosine with "
    "this SAE's (1: every control feature is here; the control's own is 1)",
}
INTERP = {
    "u": "uncertainty coefficient I(1[z_j > 0]; Y) / H(Y), averaged over alive latents",
    "u_null": "u of the same codes against permuted labels (mean of 5): U's small-n bias",
    "u_excess": "u - u_null: what the labels explain",
    "u_top": "U over the 16 latents with the highest U on train, scored on the split",
    "u_top_null": "u_top against permuted labels",
    "u_top_excess": "u_top - u_top_null",
    "alive_frac": "fraction of latents that fire on the split",
    "csi": "class selectivity index, averaged over latents",
    "ari": "adjusted Rand index of k-means (k = classes) against the labels",
    "silhouette": "silhouette of the labels' grouping (a seeded sample of 2,000 rows)",
    "davies_bouldin": "Davies-Bouldin index of the labels' grouping (lower: better separated)",
    "calinski_harabasz": "Calinski-Harabasz index of the labels' grouping",
    "probe_accuracy": "a logistic-regression probe fitted on train, scored on the split",
}
SPARSE_PROBES = (1, 5, 25)
SPARSE_PROBE = "the same probe on the k latents with the highest U on train"
SAE = {
    "fvu": "fraction of variance unexplained on validation tokens",
    "explained_variance": "1 - fvu",
    "l0": "active latents per token",
    "dead_pct": "% of latents that never fire on validation tokens",
    "l2_ratio": "SAEBench's L2 ratio: mean over tokens of ‖x̂‖ / ‖x‖ (below 1: shrinkage)",
    "train_tokens_per_s": "the SAE fit's training rate",
    "steps_to_fvu": "steps until the training FVU's trailing mean is within 10 % of its last",
}
FINETUNE = {
    "steps": "optimizer steps of the cycle's fine-tune (equal for every strategy)",
    "best_epoch": "the epoch validation chose",
    "ce": "that epoch's training cross-entropy",
    "aux": "that epoch's auxiliary (target) loss",
}
STAGES = ["model", "activations", "sae", "evaluate", "targets"]
TARGETS = {
    "kept_latents": "latents kept per example by the sharpening",
    "recon_cos": "cosine between each target and the SAE's own reconstruction (1: unchanged)",
    "initial_aux": "the auxiliary cosine loss as trained, before retraining",
}
RUN = {
    "time/{stage}_s": "seconds the cycle spent on the stage (computing, waiting or loading)",
    "artifacts/computed": "stages this trial computed this cycle (0: all shared)",
    "memory/worker_peak_mb": "highest peak resident memory of the trial's Train workers",
}
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
PAIRED_SAE = [  # the SAE's quality and the seed's structure comparison
    "sae/fvu",
    "sae/steps_to_fvu",
    OVERLAP,
    "features/firing_gini",
    "features/mean_max_decoder_cos",
    "features/decoder_silhouette",
    "absorption/mean_fraction",
    "absorption/full_rate",
]
PAIRED = [*PAIRED_TASK[False], *PAIRED_TASK[True], *PAIRED_SAE]


def task_metrics(lm: bool) -> list[str]:
    """The model's own quality, validation then held-out test: what the trade-off is
    against (accuracy for a classifier, perplexity for a causal LM)."""
    return list(LM)[:2] if lm else ["val/accuracy", "test/accuracy"]


def headline(lm: bool, ground_truth: bool = False) -> list[str]:
    """The console's and the report's columns beside the objective."""
    if ground_truth:
        return ["gt/mcc", "gt/l0", "gt/f1", "gt/explained_variance", "gt/dead_latents"]
    if lm:
        return [*list(LM)[:3], "sae/fvu", "sae/ce_loss_score", "sae/l0", "sae/dead_pct"]
    return [*task_metrics(False), "interp/u", "sae/fvu", "sae/l0", "sae/dead_pct"]


def known_metrics(lm: bool | None = None) -> list[str]:
    """Every metric name a cycle reports (the sparse probes at their default k): of a
    classification sweep, of a causal LM sweep (`lm`), or (None) of either."""
    if lm is None:
        every = known_metrics(False) + known_metrics(True) + ground_truth_metrics()
        return list(dict.fromkeys(every))
    names = [*LM, *(f"sae/{m}" for m in LM_SAE)]
    if not lm:
        names = [f"{split}/{m}" for split in ("val", "test") for m in TASK]
        probes = [m.format(k=k) for m in SAEBENCH for k in SAEBENCH_KS]
        names += [f"{head}saebench/{m}" for head in ("", "test/") for m in probes]
        for head in ("", "test/"):
            for kind in ("interp", "base"):
                names += [f"{head}{kind}/{m}" for m in INTERP]
            names += [f"{head}interp/sparse_probe_accuracy@{k}" for k in SPARSE_PROBES]
        names += [f"targets/{m}" for m in TARGETS]
    names += [f"sae/{m}" for m in SAE]
    names += [f"features/{m}" for m in FEATURES if m not in NOT_METRICS]
    names += [f"structure/{m}" for m in STRUCTURE]
    names += [f"absorption/{m}" for m in ABSORPTION]
    names += [f"finetune/{m}" for m in FINETUNE]
    paired = [*PAIRED_TASK[lm], *PAIRED_SAE]
    names += [f"{head}/{m}" for head in ("control", "delta") for m in paired]
    stages = [s for s in STAGES if not (lm and s == "targets")]  # LM targets are online
    names += [f"time/{s}_s" for s in stages] + ["artifacts/computed", "memory/worker_peak_mb"]
    return names


def ground_truth_metrics() -> list[str]:
    """Every metric a ground-truth trial reports (its one fit per seed, as cycle 0)."""
    names = [f"gt/{m}" for m in GROUND_TRUTH]
    names += [f"time/{s}_s" for s in ("activations", "sae", "evaluate")]
    return names + ["artifacts/computed", "memory/worker_peak_mb"]


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
