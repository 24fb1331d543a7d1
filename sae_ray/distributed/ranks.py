"""The ranks of a trial's Train run acting as one: who computes a missing artifact, and when
the others may read it.

Every rank of the trial's worker group runs the same cycle code. Rank 0 alone talks to the
artifact store (its lock, its publishing); the others learn from it whether a stage was
found or must be built, take their share of building it when the stage is parallel (the
fine-tune, the extraction, the SAE fit), and wait for it to be published before reading it.
Outside a process group (one process, the tests) every helper is the identity.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sae_ray import storage
from sae_ray.storage.artifacts import Artifact, ArtifactStore


def rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`t` reduced over the ranks, in place (and returned)."""
    if rank_world()[1] > 1:
        dist.all_reduce(t, op=op)
    return t


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if rank_world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if rank_world()[1] > 1:
        dist.barrier()


# What `compute` receives: where this rank writes its part (rank 0: the scratch directory
# that is published; other ranks: the same directory when the store is on a shared
# filesystem, the artifact's own bucket prefix when it is not) and whether it is rank 0's.
Compute = Callable[[str, bool], None]


def shared_artifact(
    store: ArtifactStore, kind: str, spec: dict[str, Any], compute: Compute, everyone: bool
) -> Artifact:
    """The artifact, found or built, on every rank.

    `everyone`: every rank runs `compute` (a DDP fine-tune or SAE fit, a sliced extraction);
    otherwise rank 0 builds it alone while the others wait. Rank 0 publishes once every
    rank's part is written."""
    rank, world = rank_world()
    if rank != 0:
        return _follow(kind, compute, everyone)
    found = store.find(kind, spec)
    if found is not None:
        broadcast(("found", found.location, found.key))
        return found
    with store.building(kind, spec, adopt=world == 1 or not store.remote) as (art, scratch):
        if scratch is None:
            broadcast(("found", art.location, art.key))
            return art
        parts = str(scratch) if not store.remote else art.location
        broadcast(("build", art.location, art.key, parts))
        compute(str(scratch), True)
        barrier()  # every rank's part is written
    broadcast("published")
    return art


def _follow(kind: str, compute: Compute, everyone: bool) -> Artifact:
    news = broadcast(None)
    art = Artifact(news[1], news[2])
    if news[0] == "found":
        return art
    if everyone:
        compute(news[3], False)
    barrier()
    if broadcast(None) != "published":
        raise RuntimeError(f"{kind} {art.key}: rank 0 did not publish it")
    return art


def local_part(location: str) -> tuple[Path, Callable[[], None]]:
    """A local directory for a rank's part of an artifact, and what sends it to `location`
    once written (nothing for a local location: the part is written in place)."""
    if not storage.is_remote(location):
        return Path(location), lambda: None
    tmp = Path(tempfile.mkdtemp(prefix="sae-ray-part-"))

    def send() -> None:
        storage.upload(tmp, location)
        shutil.rmtree(tmp, ignore_errors=True)

    return tmp, send
