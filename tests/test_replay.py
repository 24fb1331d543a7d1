"""A finished trial's record, and a trial at the same point reporting it again: the same
numbers, no time, nothing computed, each seed's rows where the new trial's go."""

import json

import pytest

from sae_ray import config as C
from sae_ray.storage.artifacts import ArtifactStore
from sae_ray.trial import replay
from tests.conftest import QUICKSTART


def _cycle(cycle: int) -> dict:
    return {
        "cycle": cycle,
        "interp/u": 0.3 + cycle / 10,
        "time/sae_s": 2.5,
        "artifacts/computed": 4,
        "memory/worker_peak_mb": 500.0,
        "strategy_effective": "per_class",
    }


@pytest.fixture
def ran(tmp_path):
    """A two-cycle trial that reported and wrote its seeds' rows, then was kept."""
    cfg = C.load(QUICKSTART, [f"experiment.storage_path={tmp_path}", "search.seeds=2"])
    store = ArtifactStore(tmp_path / "artifacts")
    seeds = str(tmp_path / "seeds" / "t1-c{}.json")
    for cycle in range(2):
        rows = [{"seed": s, "interp/u": 0.3 + s / 100} for s in range(2)]
        (tmp_path / "seeds").mkdir(exist_ok=True)
        (tmp_path / "seeds" / f"t1-c{cycle}.json").write_text(json.dumps(rows))
    replay.keep(store, cfg, [_cycle(0), _cycle(1)], seeds)
    return cfg, store


def test_a_point_that_ran_is_reported_again_from_its_record(ran, tmp_path):
    cfg, store = ran
    earlier = replay.recorded(store, cfg)
    reported: list[dict] = []
    replay.report_again(earlier, reported.append, str(tmp_path / "seeds" / "t2-c{}.json"))
    assert [r["interp/u"] for r in reported] == [0.3, 0.4]
    assert all(r["artifacts/computed"] == 0 and r["time/sae_s"] == 0.0 for r in reported)
    assert all("memory/worker_peak_mb" not in r for r in reported)  # no worker ran
    for cycle in range(2):
        first, again = (tmp_path / "seeds" / f"{t}-c{cycle}.json" for t in ("t1", "t2"))
        assert json.loads(again.read_text()) == json.loads(first.read_text())


@pytest.mark.parametrize(
    "change",
    ["sae.k=16", "search.seeds=3", "experiment.seed=1", "cycles.count=3", "cycles.lr=1e-4"],
)
def test_another_setting_or_seed_count_is_another_trial(ran, tmp_path, change):
    cfg, store = ran
    other = C.load(QUICKSTART, [f"experiment.storage_path={tmp_path}", "search.seeds=2", change])
    assert replay.recorded(store, other) is None
    # what only the search or W&B says does not change a trial's numbers
    same = C.load(
        QUICKSTART,
        [
            f"experiment.storage_path={tmp_path}",
            "search.seeds=2",
            "search.num_samples=9",
            "wandb.mode=disabled",
        ],
    )
    assert replay.recorded(store, same) is not None


def test_a_trial_stopped_early_keeps_no_record(tmp_path):
    cfg = C.load(QUICKSTART, [f"experiment.storage_path={tmp_path}"])  # 2 cycles
    store = ArtifactStore(tmp_path / "artifacts")
    replay.keep(store, cfg, [_cycle(0)], str(tmp_path / "seeds-{}.json"))
    assert replay.recorded(store, cfg) is None
