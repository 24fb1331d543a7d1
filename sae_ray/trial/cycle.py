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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sae_ray import telemetry
from sae_ray.config import CONTROL, Config
from sae_ray.config.metrics import PAIRED
from sae_ray.distributed.ranks import gather, rank_world
from sae_ray.distributed.trainer import worker_device as device
from sae_ray.lm.extraction import iter_tokens, load_sequences
from sae_ray.lm.models import hookpoint, load_classifier, resolve_layer
from sae_ray.lm.text_data import TextData
from sae_ray.method.evaluate import (
    accuracy,
    f1_macro,
    interp_metrics,
    sae_quality,
    sparse_codes,
)
from sae_ray.method.finetune import HISTORY, best_epoch, predict
from sae_ray.method.targets import target_report
from sae_ray.sae.model import SparseAutoencoder, decoder_absorption
from sae_ray.storage.artifacts import Artifact
from sae_ray.trial import sae_fit, stages
from sae_ray.trial.stages import Trial

log = logging.getLogger(__name__)
Report = Callable[[int, dict[str, Any]], None]


@dataclass
class Chain:
    """One seed's models through the cycles: the trial's own (and the targets that train
    the next), and the λ = 0 model of the same seed and cycle it is paired with."""

    trial: Trial
    model: Artifact | None = None
    targets: Artifact | None = None
    control: Artifact | None = None
    first: Artifact | None = None  # the cycle-0 model (a causal LM's perplexity baseline)
    base: dict[str, float] | None = None  # its perplexities, once known


def run_cycles(trial: Trial, report: Report, reported: int = 0) -> None:
    """Every cycle, for each of the trial's seeds (`search.seeds`); each cycle is reported
    as the mean over seeds, with each seed's own row under "seeds". The first `reported`
    cycles were reported before a worker-group restart: they are replayed from the store
    (their stages are found) without evaluating."""
    base = trial.cfg.experiment.seed
    chains = [Chain(trial.with_seed(base + i)) for i in range(trial.cfg.search.seeds)]
    # what each stage of a cycle took (computing, waiting on another trial, or loading) and
    # how many artifacts this trial computed: where a sweep's time goes, and what sharing saved
    times: dict[str, float] = {}
    computed = trial.store.computed
    for cycle in range(trial.cfg.cycles.count):
        evaluate = cycle >= reported
        rows = [_seed_cycle(chain, cycle, times, evaluate) for chain in chains]
        if not evaluate:
            continue
        # every rank's high-water mark and node: a collective
        peaks, nodes = zip(*gather((_peak_rss_mb(), telemetry.node())), strict=True)
        metrics: dict[str, Any] = {}
        if rank_world()[0] == 0:
            metrics = mean_over_seeds(rows)
            metrics.update(times, **{"artifacts/computed": trial.store.computed - computed})
            metrics["memory/worker_peak_mb"] = max(peaks)
            metrics["nodes"] = ",".join(sorted(set(nodes)))  # which machines ran this trial
            metrics[SEED_ROWS] = rows
        times, computed = {}, trial.store.computed
        report(cycle, metrics)


SEED_ROWS = "seeds"


def mean_over_seeds(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Numbers averaged over the seeds' rows (NaN-aware), the rest from the first, and
    `n_seeds`."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        values = [row.get(key) for row in rows]
        numbers = all(
            isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values
        )
        out[key] = float(np.nanmean(np.asarray(values, float))) if numbers else values[0]
    out.pop("seed", None)
    out["cycle"] = rows[0]["cycle"]
    out["n_seeds"] = len(rows)
    return out


def _seed_cycle(chain: Chain, cycle: int, times: dict[str, float], evaluate: bool):
    """One seed's cycle: its model, activations, SAE, evaluation and targets, then its
    λ = 0 pair's. Rank 0's evaluated row; an empty dict elsewhere."""
    trial = chain.trial
    with _timed(times, "model"):
        if cycle == 0:
            chain.model = stages.cycle0(trial)
        else:
            chain.model = stages.retrain(trial, chain.model, chain.targets, cycle)
        if cycle == 0:
            chain.first = chain.model
    metrics, chain.targets = _cycle(trial, chain.model, cycle, times, evaluate)
    paired = _paired(chain, cycle, times, evaluate, metrics)
    if metrics:
        metrics.update(paired, seed=trial.seed)
        if trial.cfg.is_lm:
            metrics.update(_perplexity_change(chain, metrics))
    return metrics


def _perplexity_change(chain: Chain, metrics: dict[str, Any]) -> dict[str, float]:
    """`perplexity_change_pct` (validation) and its test twin: the rise over the seed's
    cycle-0 model, in percent (the seed's tax check). A restarted group that did not
    evaluate cycle 0 measures that model again."""
    if chain.base is None:
        chain.base = metrics if metrics["cycle"] == 0 else _base_perplexity(chain)
    return {
        f"{head}perplexity_change_pct": 100.0
        * (metrics[f"{split}/perplexity"] / chain.base[f"{split}/perplexity"] - 1.0)
        for head, split in (("", "val"), ("test/", "test"))
    }


def _base_perplexity(chain: Chain) -> dict[str, float]:
    from sae_ray.lm.batching import packed
    from sae_ray.method.evaluate_lm import ppl

    cfg, data = chain.trial.cfg, chain.trial.data
    clf = load_classifier(chain.first.local())
    clf.model.to(device())
    blocks = packed(clf.tokenizer, data, cfg.model.max_length).splits
    return {
        f"{head}/perplexity": ppl(clf, blocks[split], cfg.model.max_length)
        for head, split in (("val", "validation"), ("test", "test"))
    }


def _paired(
    chain: Chain, cycle: int, times: dict[str, float], evaluate: bool, own: dict[str, Any]
) -> dict[str, Any]:
    """`control/<m>` and `delta/<m>` (PAIRED): the λ = 0 model of this seed and cycle (the
    control trial's own, a shared artifact) through an SAE of this trial's settings, so the
    difference isolates the strategy. The control trial, and cycle 0, are their own pair."""
    if cycle == 0 or chain.trial.strategy == CONTROL:
        chain.control, control = chain.model, own
    else:
        twin = chain.trial.as_control()
        with _timed(times, "model"):
            chain.control = stages.retrain(twin, chain.control, None, cycle)
        control, _ = _cycle(twin, chain.control, cycle, times, evaluate)
    out: dict[str, Any] = {}
    for metric in PAIRED:
        if metric in own and metric in control:
            out[f"control/{metric}"] = control[metric]
            out[f"delta/{metric}"] = own[metric] - control[metric]
    return out


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
        sae_art = sae_fit.sae(trial, acts, hp, cycle)
    metrics: dict[str, Any] = {}
    if evaluate and rank_world()[0] == 0:
        with _timed(times, "evaluate"):
            metrics = _evaluation(trial, clf, model, sae_art, acts, hp)
        metrics.update(
            {
                "cycle": cycle,
                "strategy_effective": trial.strategy,
                "is_control": trial.strategy == CONTROL,
            }
        )
    del clf
    targets = None
    if cfg.is_lm:  # online targets: topk_sharp's next cycle reads this SAE
        return metrics, sae_art if trial.strategy == "topk_sharp" else None
    if cycle + 1 < cfg.cycles.count and trial.strategy != CONTROL:
        with _timed(times, "targets"):
            targets = stages.targets(trial, sae_art, acts, hp, cycle)
            if evaluate and rank_world()[0] == 0:
                metrics.update(target_report(targets, sae_art, acts, hp, device()))
    return metrics, targets


EVALUATION = "metrics.json"  # an evaluation artifact's one file


def _evaluation(
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
    }
    if cfg.is_lm:  # the sharpened perplexity's k_sharp
        spec["sharpening"] = cfg.sharpening.model_dump(include={"k_sharp", "keep_frac"})

    def compute(out: Path) -> None:
        metrics = _model_metrics(trial, clf, model, sae_art, acts, hp)
        (out / EVALUATION).write_text(json.dumps(metrics, default=float))

    art = trial.store.get_or_compute("evaluation", spec, compute)
    return json.loads((art.local() / EVALUATION).read_text())


def _model_metrics(
    trial: Trial, clf, model: Artifact, sae_art: Artifact, acts: Artifact, hp: str
) -> dict[str, Any]:
    sae = SparseAutoencoder.load(sae_art.local())
    if clf.is_lm:
        metrics = _evaluate_lm(trial.cfg, trial.data, clf, sae, acts, hp)
    else:
        metrics = _evaluate(trial.cfg, trial.data, clf, sae, acts, hp)
    train_stats = json.loads((sae_art.local() / "train_metrics.json").read_text())
    if "tokens_per_s" in train_stats:
        metrics["sae/train_tokens_per_s"] = train_stats["tokens_per_s"]
    if "steps_to_fvu" in train_stats:
        metrics["sae/steps_to_fvu"] = train_stats["steps_to_fvu"]
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
    finally:  # summed over the cycle's seeds and pairs
        key = f"time/{stage}_s"
        times[key] = times.get(key, 0.0) + time.perf_counter() - started


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


def _evaluate_lm(
    cfg: Config, data: TextData, clf, sae: SparseAutoencoder, acts: Artifact, hp: str
) -> dict[str, Any]:
    """A causal LM's cycle: validation / test perplexity (select on validation), the SAE's
    quality on held-out tokens and spliced into the model, the perplexity with the
    sharpened reconstruction at the trial's `k_sharp`, and the dictionary's statistics."""
    from sae_ray.lm.batching import packed
    from sae_ray.method.evaluate_lm import feature_stats, ppl, splice, splice_scores

    on, block = device(), cfg.model.max_length
    splits = packed(clf.tokenizer, data, block).splits
    layer = resolve_layer(clf.model, cfg.model.layer)
    out: dict[str, Any] = {
        f"{head}/perplexity": ppl(clf, splits[split], block)
        for head, split in (("val", "validation"), ("test", "test"))
    }
    tokens = acts.local("validation") / "tokens"
    out.update({f"sae/{k}": v for k, v in sae_quality(sae, iter_tokens(tokens, hp), on).items()})
    out["sae/absorption"] = decoder_absorption(sae.W_dec.detach())
    out.update(splice_scores(clf, sae, splits["validation"], block, layer))
    k_sharp = cfg.sharpening.model_copy(update={"strategy": "topk_sharp"}).kept(sae.cfg.k, 0)
    out["sae/sharp_perplexity"] = ppl(clf, splits["validation"], block, layer, splice(sae, k_sharp))
    out.update(feature_stats(sae, iter_tokens(tokens, hp), on))
    return out
