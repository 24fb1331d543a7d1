"""What a trial leaves in its sweep's storage besides the stages' artifacts, in one place:
what, where, when it is written, and when it goes.

- `point-<trial>.json`, its searched point, in `train_runs`: written as it starts, removed
  as it ends. While it is there, the trials beside it co-train its SAEs (`cofit.py`).
- `failed-<trial>.txt`, why it failed deterministically (bad settings, NaN), in
  `train_runs`: kept, so that Tune's retry of it fails at once, without a worker group.
- `<trial>-c<cycle>.json`, each seed's row of a cycle, in `seeds/`: written by rank 0
  before the cycle's report, kept; seeds.csv is gathered from them.
- `reported.json`, how many cycles were reported, in its Train run's checkpoint: written
  with each cycle's report, so a restarted worker group reports no cycle twice; removed
  with the Train run when the trial's driver ends it.
- `trial-<key>/cycles.json`, every cycle's metrics and seed rows, in `artifacts/`: written
  when it has run all its cycles, kept; a trial at the same point replays it (`replay.py`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_ray import storage
from sae_ray.config import Config

POINT, FAILED = "point-{}.json", "failed-{}.txt"
REPORTED = "reported.json"


@dataclass(frozen=True)
class TrialRecord:
    cfg: Config
    trial_id: str

    @property
    def train_runs(self) -> str:
        return self.cfg.trial_dirs(self.trial_id)[1]

    @property
    def seeds(self) -> str:
        """Where its seeds' rows go, with `{}` for the cycle."""
        return storage.join(self.cfg.seeds_uri, f"{self.trial_id}-c{{}}.json")

    def write_seeds(self, cycle: int, rows: list[dict[str, Any]]) -> None:
        storage.write_bytes(self.seeds.format(cycle), json.dumps(rows, default=float).encode())

    @property
    def _failed(self) -> str:
        return storage.join(self.train_runs, FAILED.format(self.trial_id))

    def failure(self) -> str | None:
        """Why it failed deterministically before, or None."""
        if storage.is_file(self._failed):
            return storage.read_bytes(self._failed).decode()
        return None

    def fail(self, reason: str) -> None:
        storage.write_bytes(self._failed, reason.encode())

    def running(self, params: dict[str, Any]) -> contextlib.AbstractContextManager[None]:
        """Its point on record while the block runs (`running`)."""
        return running(self.train_runs, self.trial_id, params)


@contextlib.contextmanager
def running(train_runs: str, trial_id: str, params: dict[str, Any]) -> Iterator[None]:
    """A trial's point on record in `train_runs` while the block runs, for the SAE fits of
    the trials beside it to co-train its SAEs. With `share_artifacts: false` every trial's
    `train_runs` is its own: nobody else reads it."""
    location = storage.join(train_runs, POINT.format(trial_id))
    storage.write_bytes(location, json.dumps(params, default=str).encode())
    try:
        yield
    finally:
        storage.remove(location)


def running_points(train_runs: str) -> list[dict[str, Any]]:
    """The points of the sweep's trials running now (one that ends as they are read is
    left out)."""
    prefix, suffix = POINT.split("{}")
    out = []
    for name in storage.listdir(train_runs):
        if name.startswith(prefix) and name.endswith(suffix):
            with contextlib.suppress(FileNotFoundError):
                out.append(json.loads(storage.read_bytes(storage.join(train_runs, name))))
    return out


def mark_reported(directory: Path, cycles: int) -> None:
    """A Train checkpoint's note that `cycles` cycles have been reported."""
    (directory / REPORTED).write_text(json.dumps({"cycles": cycles}))


def reported_cycles(directory: Path) -> int:
    return json.loads((directory / REPORTED).read_text())["cycles"]
