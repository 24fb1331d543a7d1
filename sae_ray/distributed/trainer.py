"""The one way sae-ray starts a Ray Train run (fine-tunes and SAE fits alike): a
`TorchTrainer` of `resources.num_workers` workers, each asking for its CPUs (and a GPU with
`use_gpu`) when the run starts, restarted up to `resources.max_failures` times, its run
folder named `name` under `storage_path` (a reused name restores that run)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from sae_ray.config import Resources

COLLECTIVE_TIMEOUT_S = 6 * 3600
# How often a run's controller looks at its workers (Train V2's default: 2 s). A worker's
# report (each cycle's) and the run's end both wait for the next look: at the default,
# about 4.5 s of a quickstart trial's 19 s went to waiting (measured). A look is one small
# remote call per worker. Passed on to the controller from the driver's environment, so a
# value the user sets wins.
HEALTH_CHECK_INTERVAL_S = "0.25"


def worker_device() -> torch.device:
    """This Train worker's device (its GPU with `use_gpu`), or the CPU outside Ray Train."""
    try:
        return ray.train.torch.get_device()
    except RuntimeError:  # no Train session: one process (tests, tools)
        return torch.device("cpu")


def torch_trainer(
    loop: Callable[[dict[str, Any]], None],
    loop_config: dict[str, Any],
    resources: Resources,
    name: str,
    storage_path: str | Path,
    datasets: dict[str, Any] | None = None,
    callbacks: list | None = None,
) -> TorchTrainer:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", HEALTH_CHECK_INTERVAL_S)
    return TorchTrainer(
        loop,
        train_loop_config=loop_config,
        # a rank may wait on another trial building the artifact it needs (a fine-tune of a
        # big model) inside a collective: far longer than torch's 30-minute default
        torch_config=TorchConfig(timeout_s=COLLECTIVE_TIMEOUT_S),
        scaling_config=ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker},
            placement_strategy=resources.placement.upper(),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(storage_path),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
    )
