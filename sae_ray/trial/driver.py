"""A trial is one Ray Train run: its driver (`run_trial`, in the Tune trial or `sae-ray
run`) starts one `TorchTrainer` whose workers (`trial_loop`) run every stage of every
cycle on their devices, and forwards each cycle's metrics to `report`.

Worker groups are expensive to start (tens of seconds on a small machine, against seconds
of work in a small stage), so a trial pays it once, not once per stage. The driver only
orchestrates: it never builds a model (`models.forbidden`). A killed worker restarts the
group (`resources.max_failures`); the restarted ranks find every finished stage in the
artifact store, resume the SAE fit from its checkpoint, and report only the cycles not
yet reported (the run's checkpoint says how many were). A trial at a point that ran to its
end before starts no run: it reports that trial's record again (`replay.py`).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_ray import storage
from sae_ray.config import Config, sharpens
from sae_ray.distributed.ranks import rank_world
from sae_ray.distributed.trainer import torch_trainer
from sae_ray.lm.models import check_layer_index, config_of, forbidden
from sae_ray.storage.artifacts import ArtifactStore
from sae_ray.trial import replay
from sae_ray.trial.outcome import FAILED, Forward, TrialFailed
from sae_ray.trial.record import TrialRecord, mark_reported, reported_cycles

if TYPE_CHECKING:
    from sae_ray.trial.stages import Trial

__all__ = ["TrialFailed", "run_trial", "trial_loop"]
log = logging.getLogger(__name__)


def open_trial(cfg: Config, trial_id: str, plan: list[dict[str, Any]] | None = None) -> Trial:
    # The worker's stack, imported here: the Tune trial that only drives the run never
    # loads it (seconds of imports per trial).
    from sae_ray.lm.text_data import load_text_data
    from sae_ray.trial.stages import Trial

    root, train_runs = cfg.trial_dirs(trial_id)
    split = cfg.dataset.split_for(cfg.experiment.seed)
    data = None if cfg.ground_truth else load_text_data(cfg.dataset, split, documents=cfg.is_lm)
    store = ArtifactStore(root, holder=f"{cfg.experiment.name}/{trial_id}")
    return Trial(cfg, data, store, train_runs, cfg.strategy, plan or [])


def trial_loop(config: dict[str, Any]) -> None:
    """One rank of the trial's worker group: every cycle, reported through Ray Train."""
    import ray.train
    import torch

    from sae_ray.trial.cycle import run_cycles
    from sae_ray.trial.ground_truth import run_ground_truth

    threads = int(os.environ.get("SAE_RAY_TORCH_THREADS", "0"))
    if threads:
        torch.set_num_threads(threads)
    reported = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            reported = reported_cycles(Path(directory))
    cfg, trial_id = config["cfg"], config["trial_id"]
    report = functools.partial(_report_cycle, TrialRecord(cfg, trial_id))
    trial = open_trial(cfg, trial_id, config.get("plan"))
    if cfg.ground_truth:  # a synthetic world's SAEs, scored against its known features
        run_ground_truth(trial, report)
    else:
        run_cycles(trial, report, reported)


def _report_cycle(record: TrialRecord, cycle: int, metrics: dict[str, Any]) -> None:
    """Every rank reports (Ray Train's reports are collective); rank 0's carries the
    metrics and the checkpoint that marks the cycle reported, after writing each seed's
    row (a restarted group rewrites the same file)."""
    import ray.train

    from sae_ray.trial.cycle import SEED_ROWS

    if rank_world()[0] != 0:
        ray.train.report({})
        return
    record.write_seeds(cycle, metrics.pop(SEED_ROWS))
    with tempfile.TemporaryDirectory() as tmp:
        mark_reported(Path(tmp), cycle + 1)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _refuse_known_failures(cfg: Config) -> None:
    """Settings the model's config alone rules out (a sampled layer it lacks, a k above
    the sampled dictionary, a keep count that sharpens nothing) fail the trial here, before
    a worker group is started only to find out: the worker's own message (`TrialFailed`)."""
    if cfg.ground_truth:  # no model: the SAE's width is the world's
        try:
            cfg.sae.check_fits(cfg.synthetic.hidden_dim)
        except ValueError as err:
            raise TrialFailed(f"ValueError: {err}") from None
        return
    config = config_of(cfg.model.name)
    if config is None:
        return
    try:
        check_layer_index(cfg.model.layer, config.num_hidden_layers)
        cfg.sae.check_fits(config.hidden_size)
        if sharpens(cfg):
            latents = cfg.sae.latents_for(config.hidden_size)
            cfg.sharpening.check_changes_targets(cfg.sae.k, latents)
    except ValueError as err:
        raise TrialFailed(f"ValueError: {err}") from None


def run_trial(
    cfg: Config,
    report: Callable[[dict[str, Any]], None],
    trial_id: str = "run",
    plan: list[dict[str, Any]] | None = None,
):
    """Start the trial's Train run and call `report` with each cycle's metrics, in this
    thread (Tune's report, or a list's append), while the run goes on in another. `plan`:
    the sweep's points known ahead, whose SAEs this trial's fits may co-train."""
    from ray.util.queue import Empty, Queue

    _refuse_known_failures(cfg)
    root, train_runs = cfg.trial_dirs(trial_id)
    store, seeds = ArtifactStore(root), TrialRecord(cfg, trial_id).seeds
    earlier = replay.recorded(store, cfg)
    if earlier is not None:  # this point ran to its end before: the same numbers
        replay.report_again(earlier, report, seeds)
        return
    sink = Queue(actor_options={"num_cpus": 0})
    name = f"trial-{trial_id}-{uuid.uuid4().hex[:8]}"  # a Tune retry starts a fresh run
    trainer = torch_trainer(
        trial_loop,
        {"cfg": cfg, "trial_id": trial_id, "plan": plan or []},
        cfg.resources,
        name,
        train_runs,
        callbacks=[Forward(sink)],
    )
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # handed to the driver's thread below
            outcome["error"] = err

    runner = threading.Thread(target=fit, name=f"train-{name}", daemon=True)
    failed, reported = None, []
    try:
        with forbidden("a trial's driver"):
            runner.start()
            while runner.is_alive() or not sink.empty():
                try:
                    item = sink.get(timeout=0.5)
                except (Empty, queue.Empty):
                    continue
                if FAILED in item:
                    failed = item[FAILED]
                else:
                    reported.append(dict(item))
                    report(item)
        runner.join()
    finally:
        sink.shutdown()
        storage.remove(storage.join(train_runs, name))  # cycle markers; results are in Tune
    if failed is not None:  # the worker's own error, not Ray's wrapping of it
        raise TrialFailed(failed) from None
    if "error" in outcome:
        raise outcome["error"]
    try:
        replay.keep(store, cfg, reported, seeds)
    except OSError as err:  # the trial's results are in Tune: a rerun would only recompute
        log.warning("trial %s: its record for replays was not kept (%s)", trial_id, err)
