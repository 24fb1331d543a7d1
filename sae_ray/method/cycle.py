"""One trial's cycles 0..C-1 of fine-tune -> extract -> SAE -> evaluate -> sharpen, as
every rank of the trial's Train run runs them (`trial_run.py` starts that run).

`report(cycle, metrics)` is called on every rank after each cycle (rank 0 holds the
metrics; the others an empty dict): Ray Train's report, which the trial's driver forwards
to Tune, or a list's append in a single process.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from sae_ray.config import CONTROL, Config
from sae_ray.lm.extraction import iter_tokens, load_sequences
from sae_ray.lm.models import hookpoint, load_classifier, resolve_layer
from sae_ray.lm.text_data import TextData
from sae_ray.method import stages
from sae_ray.method.evaluate import (
    accuracy,
    f1_macro,
    interp_metrics,
    sae_quality,
    sparse_codes,
)
from sae_ray.method.finetune import HISTORY, best_epoch, predict
from sae_ray.method.ranks import gather, rank_world
from sae_ray.method.stages import Trial
from sae_ray.raytrain import worker_device as device
from sae_ray.sae.model import SparseAutoencoder, decoder_absorption
from sae_ray.storage.artifacts import Artifact

log = logging.getLogger(__name__)
Report = Callable[[int, dict[str, Any]], None]


def run_cycles(trial: Trial, report: Report, reported: int = 0) -> None:
    """Every cycle; the first `reported` ones were reported before a worker-group restart,
    so they are replayed from the store (their stages are found) without evaluating."""
    cfg = trial.cfg
    # what each stage of a cycle took (computing, waiting on another trial, or loading) and
    # how many artifacts this trial computed: where a sweep's time goes, and what sharing saved
    times: dict[str, float] = {}
    computed = trial.store.computed
    with _timed(times, "model"):
        model = stages.cycle0(trial)
    targets: Artifact | None = None
    for cycle in range(cfg.cycles.count):
        if cycle > 0:
            with _timed(times, "model"):
                model = stages.retrain(trial, model, targets, cycle)
        metrics, targets = _cycle(trial, model, cycle, times, evaluate=cycle >= reported)
        if cycle < reported:
            continue
        peaks = gather(_peak_rss_mb())  # every rank's high-water mark: a collective
        if rank_world()[0] == 0:
            metrics.update(times, **{"artifacts/computed": trial.store.computed - computed})
            metrics["memory/worker_peak_mb"] = max(peaks)
        times, computed = {}, trial.store.computed
        report(cycle, metrics)


def _cycle(
    trial: Trial, model: Artifact, cycle: int, times: dict[str, float], evaluate: bool = True
) -> tuple[dict[str, Any], Artifact | None]:
    """Cycle `cycle` from its model on: activations, SAE, evaluation (rank 0), and the
    targets that train the next cycle's model (none after the last cycle, or for the
    control)."""
    cfg = trial.cfg
    clf = load_classifier(model.local())
    clf.model.to(device())
    layer = resolve_layer(clf.model, cfg.model.layer)
    hp = hookpoint(clf.model, layer)
    with _timed(times, "activations"):
        acts = stages.activations(trial, clf, model, layer)
    with _timed(times, "sae"):
        sae_art = stages.sae(trial, acts, hp, cycle)
    metrics: dict[str, Any] = {}
    if evaluate and rank_world()[0] == 0:
        with _timed(times, "evaluate"):
            metrics = _cycle_metrics(trial, clf, model, sae_art, acts, hp, cycle)
    del clf
    targets = None
    if cycle + 1 < cfg.cycles.count and trial.strategy != CONTROL:
        with _timed(times, "targets"):
            targets = stages.targets(trial, sae_art, acts, hp, cycle)
            if evaluate and rank_world()[0] == 0:
                metrics.update(stages.target_report(targets, sae_art, acts, hp))
    return metrics, targets


def _cycle_metrics(
    trial: Trial, clf, model: Artifact, sae_art: Artifact, acts: Artifact, hp: str, cycle: int
) -> dict[str, Any]:
    sae = SparseAutoencoder.load(sae_art.local())
    metrics = _evaluate(trial.cfg, trial.data, clf, sae, acts, hp)
    metrics.update(
        {
            "cycle": cycle,
            "strategy_effective": trial.strategy,
            "is_control": trial.strategy == CONTROL,
        }
    )
    train_stats = json.loads((sae_art.local() / "train_metrics.json").read_text())
    if "tokens_per_s" in train_stats:
        metrics["sae/train_tokens_per_s"] = train_stats["tokens_per_s"]
    metrics.update(_finetune_stats(model.local()))
    return metrics


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def _timed(times: dict[str, float], stage: str):
    started = time.perf_counter()
    try:
        yield
    finally:
        times[f"time/{stage}_s"] = time.perf_counter() - started


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


def _evaluate(
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
    quality = sae_quality(sae, iter_tokens(acts.local("validation") / "tokens", hp), on)
    out.update({f"sae/{k}": v for k, v in quality.items()})
    out["sae/absorption"] = decoder_absorption(sae.W_dec.detach())

    def codes_of(x: np.ndarray):
        return sparse_codes(sae, x, on)

    _, y_train, x_train = load_sequences(acts.local("train", "sequences"), hp)
    train = {"interp": (codes_of(x_train), y_train), "base": (x_train, y_train)}
    seed = cfg.experiment.seed
    for split, head in (("validation", ""), ("test", "test/")):
        _, labels, x = load_sequences(acts.local(split) / "sequences", hp)
        for kind, rep in (("interp", codes_of(x)), ("base", x)):
            metrics = interp_metrics(
                train[kind], (rep, labels), data.num_classes, seed=seed, dense=kind == "base"
            )
            out.update({f"{head}{kind}/{k}": v for k, v in metrics.items()})
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in out.items()}
