"""The SAE fit as a stage of a trial's Train run: each rank's share of the token rows,
and where its checkpoints go (with the fault point the chaos tests kill it at)."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

from sae_ray.method.ranks import barrier, broadcast, rank_world
from sae_ray.sae.checkpoints import save_checkpoint, store_checkpoint
from sae_ray.sae.feeds import activation_dataset
from sae_ray.sae.trainer import Fit


def feed_split(tokens: str, hp: str):
    """This rank's equal share of the token rows, from one Ray Dataset split across the
    ranks (rank 0 plans it; each rank receives its iterator)."""
    rank, world = rank_world()
    splits = None
    if rank == 0:
        dataset, _ = activation_dataset(tokens, [hp])
        splits = dataset.streaming_split(world, equal=True)
    return broadcast(splits)[rank]


# Fault injection for chaos tests, "CYCLE:STEP[:STRATEGY]": the last rank of every SAE fit
# of cycle CYCLE (of a trial of STRATEGY, its own chain, not its paired control's)
# SIGKILLs itself once the step-STEP checkpoint is stored. A restarted group resumes the
# fit from that checkpoint, past STEP, so each fit is killed once.
KILL_SAE_FIT_AT = "SAE_RAY_KILL_SAE_FIT_AT"


def keep_checkpoint(fit: Fit, location: str, fault_point: str) -> None:
    """Store the fit's checkpoint (rank 0); `fault_point` ("CYCLE:{}:STRATEGY") is where
    this fit stands for KILL_SAE_FIT_AT."""
    if fit.rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), fit.saes, fit.opts, fit.trackers, fit.progress)
            store_checkpoint(Path(tmp), location)
    here = fault_point.format(fit.progress.step)
    wanted = os.environ.get(KILL_SAE_FIT_AT, "")
    if wanted and (here == wanted or here.startswith(f"{wanted}:")):
        barrier()  # the checkpoint is stored
        if fit.rank == rank_world()[1] - 1:
            os.kill(os.getpid(), signal.SIGKILL)
