"""results.csv from a Tune result grid: finished cycles kept, failures recorded, best chosen."""

from dataclasses import dataclass

import pandas as pd

from sae_ray.sweep.results import best_row, collect_results, summary_table, write_results


@dataclass
class _Result:  # the fields of ray.tune.Result that collect_results reads
    config: dict
    metrics_dataframe: pd.DataFrame | None
    metrics: dict
    error: BaseException | None
    path: str


def _grid():
    ok = pd.DataFrame(
        {
            "cycle": [0, 1],
            "interp/u": [0.2, 0.4],
            "val/accuracy": [0.9, 0.95],
            "trial_id": ["a", "a"],
            "time_total_s": [1.0, 2.0],
        }
    )
    half = pd.DataFrame(
        {
            "cycle": [0],
            "interp/u": [0.9],
            "val/accuracy": [0.5],
            "trial_id": ["b"],
            "time_total_s": [1.0],
        }
    )
    return [
        _Result({"sae.k": 8}, ok, {"trial_id": "a"}, None, "/x/a"),
        _Result(
            {"sae.k": 4}, half, {"trial_id": "b"}, RuntimeError("boom\nValueError: nan"), "/x/b"
        ),
        _Result({"sae.k": 2}, None, {}, RuntimeError("died early"), "/x/trial_c"),
    ]


def test_failures_are_recorded_and_finished_work_kept(tmp_path):
    rows = collect_results(_grid(), ["sae.k"])
    write_results(rows, tmp_path / "results.csv")
    frame = pd.read_csv(tmp_path / "results.csv")
    assert list(frame.columns[:3]) == ["trial_id", "cycle", "sae.k"]
    assert list(frame.columns[-2:]) == ["status", "error"]
    assert "time_total_s" not in frame.columns
    assert len(frame[frame.trial_id == "a"]) == 2
    b = frame[frame.trial_id == "b"]
    assert b["cycle"].tolist()[0] == 0 and (b["status"] == "ERROR").all()
    assert "ValueError: nan" in b["error"].dropna().tolist()
    assert frame[frame.trial_id == "trial_c"]["error"].tolist() == ["died early"]
    assert not list(tmp_path.glob("*.tmp"))


def test_best_ignores_errored_trials():
    rows = collect_results(_grid(), ["sae.k"])
    assert best_row(rows, "interp/u", "max")["trial_id"] == "a"  # b scored higher, then failed
    assert best_row(rows, "interp/u", "min")["trial_id"] == "a"
    table = summary_table(rows, ["sae.k"], "interp/u")
    assert "ERROR" in table and "COMPLETE" in table


def test_best_picks_by_the_objectives_direction():
    """With several completed trials, max and min pick different ones (one trial could not
    tell them apart)."""
    rows = [
        {"trial_id": t, "cycle": 0, "interp/u": u, "status": "COMPLETE", "error": ""}
        for t, u in (("low", 0.1), ("mid", 0.2), ("high", 0.3))
    ]
    assert best_row(rows, "interp/u", "max")["trial_id"] == "high"
    assert best_row(rows, "interp/u", "min")["trial_id"] == "low"


def test_a_trial_restored_without_its_config_keeps_its_parameters(tmp_path):
    """After `--resume`, Tune hands back a trial that had errored before with config None:
    its parameters come from the params.json Tune wrote in its folder."""
    import json

    trial_dir = tmp_path / "trial_dead"
    trial_dir.mkdir()
    (trial_dir / "params.json").write_text(json.dumps({"model.layer": 5, "sae.k": 8}))
    errored = _Result(None, None, {}, ValueError("model.layer: 5 is out of range"), str(trial_dir))
    (row,) = collect_results([errored], ["model.layer", "sae.k"])
    assert row["model.layer"] == 5 and row["sae.k"] == 8 and row["status"] == "ERROR"
    assert row["error"] == "model.layer: 5 is out of range"
