"""Content-addressed artifacts shared by the trials of a sweep, on disk or in a bucket.

An artifact's key is a hash of everything that determines it, its parent's key included,
so trials sharing a prefix (same cycle-0 model, same SAE config) reuse one computation.
Concurrent trials needing the same missing artifact serialise: one computes, the rest wait
and load. The lock is a file lock for a local root (one machine, or a shared POSIX
filesystem) and a Ray lease (`leases.py`) for an object-store root. An artifact is built
in a scratch directory and published with its completion marker last (a rename locally,
marker-after-upload in a bucket), so a crash never leaves a half-written artifact that a
reader would take for whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from sae_ray import storage

DONE = ".complete"
CHECKSUMS = "checksums.json"
BUILT = "built.json"  # the node that built it
# Bigger files (a 20B model's weight shards) are checked by size only: hashing 40 GB per
# trial would cost minutes, and safetensors refuses a truncated file by itself.
HASH_LIMIT = 1 << 30
_VERIFIED: set[str] = set()
log = logging.getLogger(__name__)


def _checksums(root: Path) -> dict[str, tuple[int, str]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_size, storage.sha256(p))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _builder() -> dict[str, Any]:
    """Which process built an artifact (its Ray node, host, pid, and when): on a cluster,
    where a stage ran, and that others found it rather than built it again."""
    import ray

    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    return {"node": node, "host": socket.gethostname(), "pid": os.getpid(), "at": time.time()}


def key_of(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass(frozen=True)
class Artifact:
    """Where a finished artifact is (a path or URI any node can read) and its key."""

    location: str
    key: str

    def local(self, *sub: str) -> Path:
        """The artifact (or one of its subdirectories) on this node's disk."""
        if storage.is_remote(self.location):
            whole = storage.cache_dir(self.location)
            if (whole / storage.FETCHED).is_file():
                return whole.joinpath(*sub)
        return storage.local_copy(storage.join(self.location, *sub))

    def uri(self, *sub: str) -> str:
        return storage.join(self.location, *sub)


class ArtifactStore:
    def __init__(self, root: str | Path, holder: str | None = None):
        self.root = storage.resolve(str(root))
        self.holder = holder  # who holds its leases in a bucket (`leases.lease`)
        self.remote = storage.is_remote(self.root)
        self.computed = 0  # artifacts this process computed (the rest were found)
        if not self.remote:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(kind: str, spec: dict[str, Any]) -> str:
        return key_of({"kind": kind, **spec})

    def artifact(self, kind: str, key: str) -> Artifact:
        return Artifact(storage.join(self.root, f"{kind}-{key}"), key)

    def exists(self, kind: str, key: str) -> bool:
        return storage.is_file(self.artifact(kind, key).uri(DONE))

    def find(self, kind: str, spec: dict[str, Any]) -> Artifact | None:
        """The finished, undamaged artifact, or None (without waiting on anyone)."""
        art = self.artifact(kind, self.key(kind, spec))
        if self.exists(kind, art.key) and not self._damage(art):
            return art
        return None

    def get_or_compute(
        self, kind: str, spec: dict[str, Any], compute: Callable[[Path], None]
    ) -> Artifact:
        """The artifact; `compute(scratch_dir)` fills it first if it is missing."""
        found = self.find(kind, spec)
        if found is not None:
            return found
        with self.building(kind, spec) as (art, scratch):
            if scratch is not None:
                compute(scratch)
        return art

    @contextlib.contextmanager
    def building(
        self, kind: str, spec: dict[str, Any], adopt: bool = True, wait: bool = True
    ) -> Iterator[tuple[Artifact, Path | None]]:
        """Hold the artifact's lock; yield it with a scratch directory to build it in (None
        when another trial finished it while we waited), and publish what the scratch holds
        when the block ends without an error.

        With `adopt` false the scratch is not made the node's cached copy of a bucket
        artifact: other processes (Train ranks) uploaded parts of it beside the scratch's.
        With `wait` false a lock someone holds is not waited for: the scratch is None (they
        are building it), which is how a fit takes on its peers' SAEs (`method/cofit.py`)."""
        key = self.key(kind, spec)
        art = self.artifact(kind, key)
        with self._lock(f"{kind}-{key}", wait) as held:
            if not held:
                yield art, None
                return
            if self.exists(kind, key):  # another trial made it while we waited
                damage = self._damage(art)
                if not damage:
                    yield art, None
                    return
                log.warning("%s is damaged (%s): computing it again", art.location, damage)
                shutil.rmtree(storage.cache_dir(art.location), ignore_errors=True)
            storage.remove(art.location)  # damaged, or a partial upload of a crashed build
            scratch = self._scratch(f"{kind}-{key}")
            try:
                yield art, scratch
                (scratch / "spec.json").write_text(
                    json.dumps(spec, indent=1, sort_keys=True, default=str)
                )
                (scratch / BUILT).write_text(json.dumps(_builder()))
                (scratch / CHECKSUMS).write_text(json.dumps(_checksums(scratch), indent=1))
                self._publish(scratch, art, adopt)
                self.computed += 1
            finally:
                shutil.rmtree(scratch, ignore_errors=True)

    def _damage(self, art: Artifact) -> str:
        """What differs from the files the artifact was published with ("" if nothing): each
        file's size, and locally its hash for files up to HASH_LIMIT. Checked once per
        process: a published artifact never changes."""
        listing = storage.join(art.location, CHECKSUMS)
        if art.location in _VERIFIED or not storage.is_file(listing):
            return ""  # (artifacts published before checksums were kept are trusted)
        expected = json.loads(storage.read_bytes(listing))
        for name, (size, digest) in expected.items():
            where = storage.join(art.location, *name.split("/"))
            found = storage.size(where) if storage.is_file(where) else None
            if found != size:
                return f"{name}: {found} bytes, published with {size}"
            if not self.remote and size <= HASH_LIMIT and storage.sha256(Path(where)) != digest:
                return f"{name}: checksum differs"
        _VERIFIED.add(art.location)
        return ""

    def count(self, kind: str) -> int:
        names = storage.listdir(self.root)
        return sum(
            1
            for n in names
            if n.startswith(f"{kind}-") and storage.is_file(storage.join(self.root, n, DONE))
        )

    @contextlib.contextmanager
    def _lock(self, name: str, wait: bool = True) -> Iterator[bool]:
        """Hold `name`'s lock (True), or, without `wait`, False at once if it is held."""
        if self.remote:
            from sae_ray.storage.leases import lease

            with lease(self.root, name, wait=wait, holder=self.holder) as held:
                yield held
            return
        lock = FileLock(str(Path(self.root) / f".{name}.lock"), timeout=-1 if wait else 0)
        try:
            lock.acquire()
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()

    def _scratch(self, name: str) -> Path:
        """A fresh build directory; with the lock held, any earlier one for the same artifact
        is a computation that died (a killed trial or driver), never to be published."""
        base = storage.cache_root() / "build" if self.remote else Path(self.root)
        for stale in base.glob(f".tmp-{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        scratch = base / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
        scratch.mkdir(parents=True)
        return scratch

    def _publish(self, scratch: Path, art: Artifact, adopt: bool = True) -> None:
        if not self.remote:
            final = Path(art.location)
            (scratch / DONE).touch()
            if final.exists():  # a stale incomplete one from a crash
                shutil.rmtree(final)
            scratch.rename(final)
            return
        storage.upload(scratch, art.location)
        storage.write_bytes(art.uri(DONE), b"")
        if adopt:
            storage.adopt(scratch, art.location)
