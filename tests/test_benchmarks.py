"""The benchmarks run and print well-formed figures (their sizes tiny: nothing here asserts a
speed), and `share_artifacts: false`, the sharing figure's baseline, gives each trial its
own store."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import run_figure
from sae_ray import config as C
from tests.conftest import QUICKSTART

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"name", "ours", "theirs", "ratio", "target", "better", "met", "config", "device"}


def test_runner_prints_one_json_line_per_figure():
    figures = ["sae_step", "extraction", "gpu_flops", "fit_bound"]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only", *figures],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [json.loads(ln) for ln in done.stdout.splitlines()]
    assert [ln["name"] for ln in lines] == [
        "sae_step_tokens_per_s",
        "fit_bound_d64",  # the runner's order: `FIGURES`
        "extraction_tokens_per_s",
        "sae_step_flops_vs_matmul",
    ]
    for ln in lines:
        assert set(ln) >= KEYS, ln
        assert ln["ours"] > 0 and ln["theirs"] > 0
        assert ln["ratio"] == pytest.approx(ln["ours"] / ln["theirs"], rel=1e-3)
        above = ln["ratio"] >= ln["target"]
        assert ln["met"] == (above if ln["better"] == "higher" else ln["ratio"] <= ln["target"])
        assert ln["device"].startswith("cpu")
    assert "sae_step_tokens_per_s" in done.stderr  # the summary table


def test_a_failing_figure_is_a_line_with_its_error():
    (line,) = run_figure("sae_step", ["--steps", "many"])
    assert line["name"] == "sae_step" and "invalid int value" in line["error"]


def test_unshared_trials_get_their_own_store_and_sae_runs(tmp_path):
    cfg = C.load(QUICKSTART, [f"experiment.storage_path={tmp_path}"])
    shared = [cfg.trial_dirs(t) for t in ("t1", "t2")]
    assert (
        shared[0]
        == shared[1]
        == (
            str(tmp_path / "quickstart" / "artifacts"),
            str(tmp_path / "quickstart" / "train_runs"),
        )
    )
    alone = C.apply_params(cfg, {"experiment.share_artifacts": False})
    a, b = (alone.trial_dirs(t) for t in ("t1", "t2"))
    assert a != b and all(path.endswith("t1") for path in a)


@pytest.mark.parametrize(
    "ours, theirs, target, better, ratio, met",
    [
        (3.0, 2.0, 1.4, "higher", 1.5, True),
        (3.0, 2.0, 1.6, "higher", 1.5, False),
        (1.0, 4.0, 0.5, "lower", 0.25, True),
        (3.0, 4.0, 0.5, "lower", 0.75, False),
    ],
)
def test_a_figures_ratio_and_verdict(capsys, ours, theirs, target, better, ratio, met):
    """The line's arithmetic against hand-worked values, not against the formula it uses."""
    from benchmarks.common import emit

    line = emit("x", ours, theirs, target=target, better=better, config={}, device="cpu")
    assert line["ratio"] == ratio and line["met"] is met
    assert json.loads(capsys.readouterr().out) == line
