"""W&B: one run per trial, grouped by sweep, and one summary run per sweep.

Each trial's run carries the whole config flattened to dotted keys (`sae.k`,
`cycles.aux_weight`, `model.name`, ...), searched or fixed, so W&B's parallel coordinates,
parameter importance and run comparer see every setting under the name the YAML uses. The
summary run holds the results table, the report's figures and the best trial(s).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray.air.integrations.wandb import WandbLoggerCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sae_ray import storage
from sae_ray.config import Config

log = logging.getLogger(__name__)


def flat_config(cfg: Config) -> dict[str, Any]:
    """Every setting under its dotted name; the search section is the sweep's, not a trial's."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        else:
            out[prefix] = value

    walk("", cfg.model_dump(mode="json", exclude={"search", "wandb"}))
    return out


def runs_root(cfg: Config) -> Path:
    """Where W&B writes the trials' runs: the sweep itself when local; for a bucket sweep a
    local folder that `publish_runs` uploads when the sweep ends."""
    if storage.is_remote(cfg.sweep_uri):
        return storage.cache_root() / "wandb" / cfg.experiment.name
    return cfg.sweep_dir


class SweepWandb(WandbLoggerCallback):
    """Ray's W&B callback, with the fixed settings beside the trial's searched ones, and
    each run written straight into its trial's folder under the sweep. (By default it writes
    in the trial's driver-side scratch folder, which Tune copies to storage at the end of the
    sweep, before the last trial's logger has flushed: that run lost its history.)"""

    def __init__(self, fixed: dict[str, Any], root: Path, **kwargs: Any):
        super().__init__(**kwargs)
        self.fixed, self.root = fixed, root

    def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
        if not self._remote_logger_class:
            # Ray's own asks for restarts that cannot work (its constructor arguments live in
            # the object store: Ray says so on the console, ray-project/ray#53727): none.
            env = {k: os.environ[k] for k in ("WANDB_API_KEY",) if k in os.environ}
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), False)
            self._remote_logger_class = ray.remote(
                num_cpus=0,
                scheduling_strategy=here,  # the driver's node: the run folder is local to it
                runtime_env={"env_vars": env},
                max_restarts=0,
            )(self._logger_actor_cls)
        config = wandb_init_kwargs.get("config") or {}
        wandb_init_kwargs["config"] = {**self.fixed, **config}  # the trial's values win
        run_dir = self.root / f"trial_{trial.trial_id}"
        run_dir.mkdir(parents=True, exist_ok=True)
        wandb_init_kwargs["dir"] = str(run_dir)
        return super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)


def publish_runs(cfg: Config) -> None:
    """A bucket sweep's offline trial runs, from the driver's disk to their trial folders."""
    if not storage.is_remote(cfg.sweep_uri):
        return
    for wandb_dir in sorted(runs_root(cfg).glob("trial_*/wandb")):
        storage.upload(wandb_dir, storage.join(cfg.sweep_uri, wandb_dir.parent.name, "wandb"))


def log_summary(cfg: Config, rows: list[dict[str, Any]], report_dir: Path | None) -> str:
    """One run for the sweep: results table, report figures, best trial(s) in its summary.

    Offline, the run's files go under the sweep (`<sweep>/wandb/offline-run-*`); `wandb
    sync` uploads them with the trials'. Returns where the run's directory is."""
    import wandb

    from sae_ray.sweep.results import best_summary

    remote = storage.is_remote(cfg.sweep_uri)
    base = Path(tempfile.mkdtemp(prefix="sae-ray-wandb-")) if remote else cfg.sweep_dir
    run = wandb.init(
        project=cfg.wandb.project,
        group=cfg.experiment.name,
        name=f"{cfg.experiment.name}-summary",
        job_type="sweep-summary",
        mode=cfg.wandb.mode,
        dir=str(base),
        config=flat_config(cfg),
        settings=wandb.Settings(silent=True, console="off"),
        reinit="create_new",
    )
    frame = pd.DataFrame(rows)
    payload: dict[str, Any] = {"results": wandb.Table(dataframe=frame.astype(str))}
    if report_dir is not None:
        for png in sorted(report_dir.glob("*.png")):
            payload[f"report/{png.stem}"] = wandb.Image(str(png))
    run.log(payload)
    summary = best_summary(rows, cfg)
    if summary.get("best"):
        run.summary["best/trial_id"] = summary["best"]["trial_id"]
        for key, value in summary["best"]["objectives"].items():
            run.summary[f"best/{key}"] = value
    if "pareto_front" in summary:
        run.summary["pareto_front"] = [e["trial_id"] for e in summary["pareto_front"]]
    run_dir = Path(run.dir).parent  # <base>/wandb/<offline-run-...>/files -> the run
    run.finish()
    # finish() can return before W&B's core has closed the run file (seen under load: an
    # empty run-*.wandb); teardown waits for it, so what is read or uploaded is whole.
    wandb.teardown()
    if remote:
        target = storage.join(cfg.sweep_uri, "wandb", run_dir.name)
        storage.upload(run_dir, target)
        return target
    return str(run_dir)
