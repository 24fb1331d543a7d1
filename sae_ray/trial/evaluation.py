"""A cycle's evaluation as an artifact: a model and its SAE measured once per sweep (the
classifier's accuracy and interpretability scores, or a causal LM's perplexities, the SAE's
quality, and how the model was fine-tuned), whichever trial asks first."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sae_ray.config import Config
from sae_ray.distributed.trainer import worker_device as device
from sae_ray.lm.extraction import iter_tokens, load_sequences
from sae_ray.lm.models import resolve_layer
from sae_ray.lm.text_data import TextData
from sae_ray.method.absorption import absorption_on_tokens
from sae_ray.method.dictionary import feature_stats
from sae_ray.method.evaluate import (
    accuracy,
    f1_macro,
    interp_metrics,
    sae_quality,
    sparse_codes,
)
from sae_ray.method.finetune import HISTORY, best_epoch, predict
from sae_ray.method.sparse_probing import sparse_probing
from sae_ray.sae.decoder import dictionary_overlap
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.storage.artifacts import Artifact
from sae_ray.trial.stages import Trial

EVALUATION = "metrics.json"  # an evaluation artifact's one file


def evaluation(
    trial: Trial, clf, model: Artifact, sae_art: Artifact, acts: Artifact, hp: str
) -> dict[str, Any]:
    """The metrics of a model and its SAE, an artifact computed once per sweep: every trial
    evaluates the cycle-0 model through an SAE of its settings, and pairs with the λ = 0
    model of its seed and cycle through the same SAE, which the control trial and every
    trial of those settings evaluate too. For a large model its forward passes over
    validation and test are the cost."""
    cfg = trial.cfg
    spec: dict[str, Any] = {
        "parent": sae_art.key,  # which names its activations, which name their model
        "dataset": cfg.dataset.model_dump(),
        "max_length": cfg.model.max_length,
        "seed": cfg.experiment.seed,  # the clustering's and the null's streams
        "metrics": 5,  # the set it holds (5: SAEBench's probing, absorption, dictionary's)
    }
    if cfg.is_lm:  # the sharpened perplexity's k_sharp
        spec["sharpening"] = cfg.sharpening.model_dump(include={"k_sharp", "keep_frac"})

    def compute(out: Path) -> None:
        metrics = _metrics(trial, clf, model, sae_art, acts, hp)
        (out / EVALUATION).write_text(json.dumps(metrics, default=float))

    art = trial.store.get_or_compute("evaluation", spec, compute)
    return json.loads((art.local() / EVALUATION).read_text())


def overlap(reference: Artifact, sae: Artifact) -> float:
    """How much of `reference`'s dictionary `sae`'s holds (`dictionary_overlap`)."""
    if reference.key == sae.key:
        return 1.0
    w_ref, w = (SparseAutoencoder.load(a.local()).W_dec for a in (reference, sae))
    return dictionary_overlap(w_ref, w)


def _metrics(
    trial: Trial, clf, model: Artifact, sae_art: Artifact, acts: Artifact, hp: str
) -> dict[str, Any]:
    sae = SparseAutoencoder.load(sae_art.local())
    if clf.is_lm:
        metrics = lm_metrics(trial.cfg, trial.data, clf, sae, acts, hp)
    else:
        metrics = classifier_metrics(trial.cfg, trial.data, clf, sae, acts, hp)
    train_stats = json.loads((sae_art.local() / "train_metrics.json").read_text())
    if "tokens_per_s" in train_stats:
        metrics["sae/train_tokens_per_s"] = train_stats["tokens_per_s"]
    if "steps_to_fvu" in train_stats:
        metrics["sae/steps_to_fvu"] = train_stats["steps_to_fvu"]
    metrics.update(_finetune_stats(model.local()))
    return metrics


def dictionary_metrics(sae: SparseAutoencoder, tokens: Path, hp: str, tokenizer, on):
    """`features/...` and `absorption/...` of the SAE on the held-out token rows: what a
    classifier's cycle and a causal LM's both report."""
    out = feature_stats(sae, iter_tokens(tokens, hp), on)
    absorption = absorption_on_tokens(sae, tokens, hp, tokenizer, on)
    return {**out, **{f"absorption/{k}": v for k, v in absorption.items()}}


def _finetune_stats(model_dir: Path) -> dict[str, float]:
    """How the cycle's model was trained: steps (equal across strategies and the control),
    the epoch validation chose, and that epoch's training losses."""
    history = json.loads((model_dir / HISTORY).read_text())
    if not history:
        return {"finetune/steps": 0.0}
    best = best_epoch(history)
    out = {"finetune/steps": float(history[-1]["steps"]), "finetune/best_epoch": best["epoch"]}
    out.update({f"finetune/{k}": best[k] for k in ("ce", "aux") if k in best})
    return out


def classifier_metrics(
    cfg: Config, data: TextData, clf, sae: SparseAutoencoder, acts: Artifact, hp: str
) -> dict[str, Any]:
    """Selection metrics on validation; the held-out test split is reported, never selected on.

    `interp/...` read the SAE codes at the pooled position, `base/...` the same dense
    activations without the SAE (what the SAE adds, or loses, is the difference)."""
    out: dict[str, Any] = {}
    for split, prefix in (("validation", "val"), ("test", "test")):
        preds = predict(clf, data.splits[split], cfg.model.max_length)
        labels = data.splits[split].labels
        out[f"{prefix}/accuracy"] = accuracy(preds, labels)
        out[f"{prefix}/f1_macro"] = f1_macro(preds, labels, data.num_classes)
    on = device()
    tokens = acts.local("validation") / "tokens"
    out.update({f"sae/{k}": v for k, v in sae_quality(sae, iter_tokens(tokens, hp), on).items()})
    out.update(dictionary_metrics(sae, tokens, hp, clf.tokenizer, on))

    def codes_of(x: np.ndarray):
        return sparse_codes(sae, x, on)

    _, y_train, x_train = load_sequences(acts.local("train", "sequences"), hp)
    train = {"interp": (codes_of(x_train), y_train), "base": (x_train, y_train)}
    seed = cfg.experiment.seed
    for split, head in (("validation", ""), ("test", "test/")):
        _, labels, x = load_sequences(acts.local(split) / "sequences", hp)
        codes = codes_of(x)
        for kind, rep in (("interp", codes), ("base", x)):
            metrics = interp_metrics(
                train[kind], (rep, labels), data.num_classes, seed=seed, dense=kind == "base"
            )
            out.update({f"{head}{kind}/{k}": v for k, v in metrics.items()})
        probes = sparse_probing(
            (train["interp"][0], codes), (x_train, x), (y_train, labels), seed=seed
        )
        out.update({f"{head}saebench/{k}": v for k, v in probes.items()})
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}


def lm_metrics(
    cfg: Config, data: TextData, clf, sae: SparseAutoencoder, acts: Artifact, hp: str
) -> dict[str, Any]:
    """A causal LM's cycle: validation / test perplexity (select on validation), the SAE's
    quality on held-out tokens and spliced into the model, the perplexity with the
    sharpened reconstruction at the trial's `k_sharp`, and the dictionary's statistics."""
    from sae_ray.lm.batching import packed
    from sae_ray.method.evaluate_lm import ppl, splice, splice_scores

    on, block = device(), cfg.model.max_length
    splits = packed(clf.tokenizer, data, block).splits
    layer = resolve_layer(clf.model, cfg.model.layer)
    out: dict[str, Any] = {
        f"{head}/perplexity": ppl(clf, splits[split], block)
        for head, split in (("val", "validation"), ("test", "test"))
    }
    tokens = acts.local("validation") / "tokens"
    out.update({f"sae/{k}": v for k, v in sae_quality(sae, iter_tokens(tokens, hp), on).items()})
    out.update(splice_scores(clf, sae, splits["validation"], block, layer))
    k_sharp = cfg.sharpening.model_copy(update={"strategy": "topk_sharp"}).kept(sae.cfg.k, 0)
    out["sae/sharp_perplexity"] = ppl(clf, splits["validation"], block, layer, splice(sae, k_sharp))
    out.update(dictionary_metrics(sae, tokens, hp, clf.tokenizer, on))
    return out
