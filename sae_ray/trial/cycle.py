"""One trial's cycles 0..C-1 of fine-tune -> extract -> SAE -> evaluate -> sharpen, as
every rank of the trial's Train run runs them (`driver.py` starts that run; each stage is
in `stages.py` and `sae_fit.py`, the evaluation in `evaluation.py`).

`report(cycle, metrics)` is called on every rank after each cycle (rank 0 holds the
metrics; the others an empty dict): Ray Train's report, which the trial's driver forwards
to Tune, or a list's append in a single process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sae_ray import telemetry
from sae_ray.config import CONTROL
from sae_ray.config.metrics import OVERLAP, PAIRED
from sae_ray.distributed.ranks import gather, rank_world
from sae_ray.distributed.trainer import worker_device as device
from sae_ray.lm.models import hookpoint, load_classifier, resolve_layer
from sae_ray.method.targets import target_report
from sae_ray.storage.artifacts import Artifact
from sae_ray.trial import sae_fit, stages
from sae_ray.trial.evaluation import evaluation, overlap
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
    chains = [Chain(trial.seeded(seed)) for seed in trial.seeds()]
    # what each stage of a cycle took (computing, waiting on another trial, or loading) and
    # how many artifacts this trial computed: where a sweep's time goes, and what sharing saved
    times: dict[str, float] = {}
    computed = trial.store.computed
    for cycle in range(trial.cfg.cycles.count):
        evaluate = cycle >= reported
        rows = [_seed_cycle(chain, cycle, times, evaluate) for chain in chains]
        if not evaluate:
            continue
        metrics = cycle_metrics(rows, times, trial.store.computed - computed)
        times, computed = {}, trial.store.computed
        report(cycle, metrics)


SEED_ROWS = "seeds"


def cycle_metrics(
    rows: list[dict[str, Any]], times: dict[str, float], computed: int
) -> dict[str, Any]:
    """What a cycle reports (rank 0; an empty dict elsewhere): the mean over the seeds'
    `rows`, each seed's row under SEED_ROWS, where its time went, the artifacts it
    computed, and every rank's peak memory and node (gathered: every rank calls it)."""
    peaks, nodes = zip(*gather((peak_rss_mb(), telemetry.node())), strict=True)
    if rank_world()[0] != 0:
        return {}
    metrics = {**mean_over_seeds(rows), **times, "artifacts/computed": computed}
    metrics["memory/worker_peak_mb"] = max(peaks)
    metrics["nodes"] = ",".join(sorted(set(nodes)))  # which machines ran this trial
    metrics[SEED_ROWS] = rows
    return metrics


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
    with timed(times, "model"):
        if cycle == 0:
            chain.model = stages.cycle0(trial)
        else:
            chain.model = stages.retrain(trial, chain.model, chain.targets, cycle)
        if cycle == 0:
            chain.first = chain.model
    metrics, chain.targets, sae = _cycle(trial, chain.model, cycle, times, evaluate)
    paired = _paired(chain, cycle, times, evaluate, metrics, sae)
    if metrics:
        metrics.update(paired, seed=trial.sae_seed)
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
    chain: Chain,
    cycle: int,
    times: dict[str, float],
    evaluate: bool,
    own: dict[str, Any],
    sae: Artifact,
) -> dict[str, Any]:
    """`control/<m>` and `delta/<m>` (PAIRED): the λ = 0 model of this seed and cycle (the
    control trial's own, a shared artifact) through an SAE of this trial's settings, so the
    difference isolates the strategy. The control trial, and cycle 0, are their own pair.
    `structure/dict_overlap`: how much of the control's dictionary this SAE holds (1 for
    the control itself, its `control/` value)."""
    control_sae = sae
    if cycle == 0 or chain.trial.strategy == CONTROL:
        chain.control, control = chain.model, own
    else:
        twin = chain.trial.as_control()
        with timed(times, "model"):
            chain.control = stages.retrain(twin, chain.control, None, cycle)
        control, _, control_sae = _cycle(twin, chain.control, cycle, times, evaluate)
    if own:
        own[OVERLAP] = overlap(control_sae, sae)
        control = {**control, OVERLAP: 1.0}
    out: dict[str, Any] = {}
    for metric in PAIRED:
        if metric in own and metric in control:
            out[f"control/{metric}"] = control[metric]
            out[f"delta/{metric}"] = own[metric] - control[metric]
    return out


def _cycle(
    trial: Trial, model: Artifact, cycle: int, times: dict[str, float], evaluate: bool = True
) -> tuple[dict[str, Any], Artifact | None, Artifact]:
    """Cycle `cycle` from its model on: activations, SAE, evaluation (rank 0), and the
    targets that train the next cycle's model (none after the last cycle, or for the
    control); and the SAE."""
    cfg = trial.cfg
    clf = load_classifier(model.local())
    clf.model.to(device())
    layer = resolve_layer(clf.model, cfg.model.layer)
    hp = hookpoint(clf.model, layer)
    with timed(times, "activations"):
        acts = stages.activations(trial, clf, model, layer)
    with timed(times, "sae"):
        sae_art = sae_fit.fitted_sae(trial, acts, hp, cycle)
    metrics: dict[str, Any] = {}
    if evaluate and rank_world()[0] == 0:
        with timed(times, "evaluate"):
            metrics = evaluation(trial, clf, model, sae_art, acts, hp)
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
        return metrics, sae_art if trial.strategy == "topk_sharp" else None, sae_art
    if cycle + 1 < cfg.cycles.count and trial.strategy != CONTROL:
        with timed(times, "targets"):
            targets = stages.sharpened_targets(trial, sae_art, acts, hp, cycle)
            if evaluate and rank_world()[0] == 0:
                metrics.update(target_report(targets, sae_art, acts, hp, device()))
    return metrics, targets, sae_art


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def timed(times: dict[str, float], stage: str):
    started = time.perf_counter()
    try:
        yield
    finally:  # summed over the cycle's seeds and pairs
        key = f"time/{stage}_s"
        times[key] = times.get(key, 0.0) + time.perf_counter() - started
