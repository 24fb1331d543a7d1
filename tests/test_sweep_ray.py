"""A real 2-objective NSGA-II sweep whose driver is SIGKILLed after one trial completed, then
finished with `--resume`: every trial present once, the completed one not re-run, a trial
that fails (a layer the model does not have) recorded with its error while the sweep goes
on, a Pareto front in which no member is dominated by another trial, and the sweep's custom
metrics on the node's metrics endpoint while it runs."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pandas as pd
import pytest

from tests.conftest import METRICS_PORT, QUICKSTART, ROOT

pytestmark = pytest.mark.ray

TRIALS = 3
CYCLES = 1
OVERRIDES = [
    "experiment.name=pareto",
    "dataset.num_examples=400",
    f"cycles.count={CYCLES}",
    "cycles.epochs=1",
    "sae.epochs=2",
    "search.algorithm=nsga2",
    f"search.num_samples={TRIALS}",
    "search.control=false",
    "search.objectives=[{metric: interp/u, mode: max}, {metric: sae/fvu, mode: min}]",
    "search.space={sae.k: {type: choice, values: [2, 4, 8, 16]}, "
    "sae.expansion_factor: {type: intlog, low: 2, high: 8}, "
    "sae.architecture: {type: choice, values: [topk, jumprelu]}, "
    "model.layer: {type: choice, values: [-1, -2, 5]}}",  # tiny-gpt2 has 2 blocks
    # one trial completes, one fails, one (a JumpReLU) is being built when the driver is killed
    "search.points_to_evaluate=[{sae.k: 4, sae.expansion_factor: 2, model.layer: -1, "
    "sae.architecture: topk}, "
    "{sae.k: 8, sae.expansion_factor: 2, model.layer: 5, sae.architecture: topk}, "
    "{sae.k: 2, sae.expansion_factor: 4, model.layer: -2, sae.architecture: jumprelu}]",
    "wandb.mode=disabled",
]


def _terminated(sweep_dir) -> list[str]:
    """Trials Tune's saved experiment state records as finished (what a resume trusts)."""
    done = []
    for state in sweep_dir.glob("experiment_state-*.json"):
        try:
            trials = json.loads(state.read_text())["trial_data"]
        except (ValueError, KeyError):
            continue  # being rewritten
        for trial_json, _ in trials:
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.append(trial["trial_id"])
    return done


class Scraper(threading.Thread):
    """Reads the node's Prometheus endpoint every second, keeping the sae_ray_* series of
    the sweep it was given: what a dashboard or Prometheus would see while the sweep runs."""

    def __init__(self, sweep: str):
        super().__init__(daemon=True)
        self.sweep, self.seen, self.stop = sweep, set(), threading.Event()

    def run(self):
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        while not self.stop.is_set():
            try:
                text = urllib.request.urlopen(url, timeout=5).read().decode()
            except OSError:
                text = ""
            for line in text.splitlines():
                match = re.match(r"(?:ray_)?(sae_ray_\w+)\{.*sweep=\"(\w+)\"", line)
                if match and match.group(2) == self.sweep:
                    self.seen.add(match.group(1))
            self.stop.wait(1.0)


@pytest.fixture(scope="session")
def resumed_sweep(ray_cluster, tmp_path_factory):
    from sae_ray.cli import main as cli

    scraper = Scraper("pareto")
    scraper.start()
    storage = tmp_path_factory.mktemp("resume")
    args = [str(QUICKSTART), *OVERRIDES, f"experiment.storage_path={storage}"]
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(
        [sys.executable, "-m", "sae_ray", "sweep", *args, "--address", address],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    sweep_dir = storage / "pareto"
    deadline = time.time() + 480
    # Killed while a trial is building an artifact, after another has finished: the resume
    # must neither lose the finished trial nor use the half-built artifact.
    while not (_terminated(sweep_dir) and _scratch(sweep_dir)):
        assert driver.poll() is None, "the sweep ended before a trial completed and another built"
        assert time.time() < deadline, "no trial completed in 8 minutes"
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    killed_while_building = _scratch(sweep_dir)
    done = _terminated(sweep_dir)
    before = {t: (sweep_dir / f"trial_{t}" / "result.json").read_text() for t in done}
    assert not (sweep_dir / "results.csv").exists()  # it really died mid-sweep
    assert cli.main(["sweep", *args, "--resume"]) == 0
    time.sleep(12)  # one more export interval for the last values
    scraper.stop.set()
    scraper.join()
    return sweep_dir, before, scraper.seen, killed_while_building


def _scratch(sweep_dir) -> list[str]:
    """Artifacts being built (the store's scratch directories)."""
    return [p.name for p in (sweep_dir / "artifacts").glob(".tmp-*")]


def test_resume_finishes_every_trial_once_without_rerunning_completed(resumed_sweep):
    sweep_dir, before, _, _ = resumed_sweep
    results = pd.read_csv(sweep_dir / "results.csv")
    assert results["trial_id"].nunique() == TRIALS
    assert len(results) == TRIALS  # one row each (one cycle, or the error), none twice
    failed = results[results["status"] == "ERROR"]
    assert (failed["model.layer"] == 5).all() and len(failed) >= 1
    assert failed["error"].str.contains("model.layer: 5 is out of range").all()
    assert (results.loc[results["model.layer"] != 5, "status"] == "COMPLETE").all()
    jumprelu = results[results["sae.architecture"] == "jumprelu"].iloc[0]  # searched like k
    assert jumprelu["status"] == "COMPLETE" and jumprelu["sae/l0"] > 0
    for trial, text in before.items():  # a re-run would have appended results again
        after = (sweep_dir / f"trial_{trial}" / "result.json").read_text()
        # Tune may record a trial TERMINATED before its result.json is flushed: an empty file
        # at the kill is completed by the resume, once (one line per cycle), never repeated
        assert after == text or (not text and len(after.splitlines()) == CYCLES), (text, after)


def test_two_objective_sweep_writes_an_undominated_pareto_front(resumed_sweep):
    sweep_dir, _, _, _ = resumed_sweep
    results = pd.read_csv(sweep_dir / "results.csv")
    results = results[results["status"] == "COMPLETE"]
    front = json.loads((sweep_dir / "best.json").read_text())["pareto_front"]
    assert front
    for member in front:
        u, fvu = member["objectives"]["interp/u"], member["objectives"]["sae/fvu"]
        better = results[
            (results["interp/u"] >= u)
            & (results["sae/fvu"] <= fvu)
            & ((results["interp/u"] > u) | (results["sae/fvu"] < fvu))
        ]
        assert better.empty, f"{member['trial_id']} is dominated"
    front_ids = {m["trial_id"] for m in front}
    for _, row in results.iterrows():  # and every trial off the front is dominated by it
        if row["trial_id"] not in front_ids:
            assert any(
                m["objectives"]["interp/u"] >= row["interp/u"]
                and m["objectives"]["sae/fvu"] <= row["sae/fvu"]
                for m in front
            )
    import optuna

    study = optuna.load_study(study_name="pareto", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.trials) == TRIALS and len(study.directions) == 2


def test_custom_metrics_reach_the_metrics_endpoint_while_the_sweep_runs(resumed_sweep):
    _, _, seen, _ = resumed_sweep
    assert {
        "sae_ray_trials_finished_total",
        "sae_ray_trials_errored_total",
        "sae_ray_best_objective",
        "sae_ray_sae_tokens_per_s",
        "sae_ray_extraction_rows_per_s",
    } <= seen, seen


def test_an_artifact_half_built_when_the_driver_died_is_never_used(resumed_sweep):
    """The kill left a scratch directory; the resume rebuilt that artifact (removing the
    scratch) and every published artifact matches the files it was published with."""
    from sae_ray.storage import artifacts as store_mod
    from sae_ray.storage.artifacts import DONE, ArtifactStore

    sweep_dir, _, _, killed_while_building = resumed_sweep
    assert killed_while_building  # the kill really fell inside a computation
    assert not _scratch(sweep_dir)
    artifacts = [p for p in (sweep_dir / "artifacts").iterdir() if not p.name.startswith(".")]
    store = ArtifactStore(sweep_dir / "artifacts")
    store_mod._VERIFIED.clear()
    for path in artifacts:
        kind, key = path.name.split("-", 1)
        assert (path / DONE).is_file(), path.name
        assert store._damage(store.artifact(kind, key)) == "", path.name
    built = {name.split("-")[1] + "-" + name.split("-")[2] for name in killed_while_building}
    assert built <= {p.name for p in artifacts}  # what was being built exists, whole
