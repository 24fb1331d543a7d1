"""Cluster-wide "one computes, the rest wait" for artifacts kept in object storage.

A file lock needs a filesystem every trial shares; an object store has none (and no
rename). A small named Ray actor hands out leases per artifact key instead. A lease lasts
`ttl` seconds and its holder renews it from a thread, so a trial that dies (or whose node
does) frees its keys within `ttl` without anyone having to notice. Should two holders ever
overlap (a process paused past its lease), both write the same content-addressed artifact
and the completion marker goes last, so readers are still never shown half an artifact.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import uuid
from collections.abc import Iterator

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

NAMESPACE = "sae-ray"


@ray.remote(num_cpus=0, max_restarts=-1)
class LeaseTable:
    def __init__(self) -> None:
        self.leases: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, holder: str, ttl: float) -> bool:
        """Take or renew `key` for `holder`; False while someone else's lease is live."""
        now = time.monotonic()
        current = self.leases.get(key)
        if current is None or current[0] == holder or current[1] < now:
            self.leases[key] = (holder, now + ttl)
            return True
        return False

    def release(self, key: str, holder: str) -> None:
        if self.leases.get(key, ("",))[0] == holder:
            del self.leases[key]


def table_name(root: str) -> str:
    return "leases-" + hashlib.sha256(root.encode()).hexdigest()[:16]


def lease_table(root: str):
    """The lease table for a storage root, started by whichever process asks first.

    Every sweep (job) writing under `root` shares it, so concurrent sweeps on one bucket
    do not recompute each other's artifacts either."""
    return LeaseTable.options(
        name=table_name(root),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime="detached",
        # Trials run inside Tune's placement groups, which capture their children: a table
        # started there would die, and never restart, with the first trial's group.
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
    ).remote()


@contextlib.contextmanager
def lease(
    root: str,
    key: str,
    ttl: float = 60.0,
    poll: float = 1.0,
    wait: bool = True,
    holder: str | None = None,
) -> Iterator[bool]:
    """Hold `key`'s lease (True); without `wait`, False at once while another holds it.

    `holder` names who holds it across processes (a trial): a worker group restarted after
    its node died takes its own leases back at once, instead of waiting out the `ttl` of
    the dead group's, and resumes its fits before another trial starts them over."""
    table = lease_table(root)
    holder = holder or uuid.uuid4().hex
    while not ray.get(table.acquire.remote(key, holder, ttl)):
        if not wait:
            yield False
            return
        time.sleep(poll)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            with contextlib.suppress(Exception):  # a missed renewal only risks a recompute
                ray.get(table.acquire.remote(key, holder, ttl))

    renewer = threading.Thread(target=renew, daemon=True, name=f"lease-{key}")
    renewer.start()
    try:
        yield True
    finally:
        stop.set()
        renewer.join()
        with contextlib.suppress(Exception):
            ray.get(table.release.remote(key, holder))
