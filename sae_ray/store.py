"""Content-addressed artifacts shared by the trials of a sweep.

An artifact's key is a hash of everything that determines it, its parent's key included,
so trials sharing a prefix (same cycle-0 model, same SAE config) reuse one computation.
Concurrent trials needing the same missing artifact serialise on a file lock: one computes,
the rest wait and load. Results are built in a temporary directory and renamed into place,
so a crash never leaves a half-written artifact under its final name.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock

DONE = ".complete"


def key_of(spec: dict[str, Any]) -> str:
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key(kind: str, spec: dict[str, Any]) -> str:
        return key_of({"kind": kind, **spec})

    def path(self, kind: str, key: str) -> Path:
        return self.root / f"{kind}-{key}"

    def exists(self, kind: str, key: str) -> bool:
        return (self.path(kind, key) / DONE).is_file()

    def get_or_compute(
        self, kind: str, spec: dict[str, Any], compute: Callable[[Path], None]
    ) -> tuple[Path, str]:
        """The artifact's directory and key; `compute(tmp_dir)` fills it if it is missing."""
        key = self.key(kind, spec)
        final = self.path(kind, key)
        if self.exists(kind, key):
            return final, key
        with FileLock(str(self.root / f".{kind}-{key}.lock")):
            if self.exists(kind, key):  # another trial made it while we waited
                return final, key
            tmp = self.root / f".tmp-{kind}-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                compute(tmp)
                (tmp / "spec.json").write_text(
                    json.dumps(spec, indent=1, sort_keys=True, default=str)
                )
                (tmp / DONE).touch()
                if final.exists():  # a stale incomplete one from a crash
                    shutil.rmtree(final)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return final, key

    def count(self, kind: str) -> int:
        return sum(1 for p in self.root.glob(f"{kind}-*") if (p / DONE).is_file())
