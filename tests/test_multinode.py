"""A sweep on a cluster of several machines, simulated the way Ray's own tests do: a head
and two worker nodes as separate raylets on this host (`ray.cluster_utils.Cluster`), each
with its own CPUs, the sweep joining it with `--address` as a user's would, its storage in
a bucket (the local S3 server) that every node reads and writes."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pandas as pd
import pytest

from sae_ray.storage.artifacts import BUILT, DONE
from sae_ray.trial.sae_fit import HOLD_NOTE, HOLD_SAE_FIT_AT
from tests.conftest import QUICKSTART, ROOT, ray_cli

pytestmark = pytest.mark.ray
BUCKET = "s3://sae-ray-test/multinode"
# The quickstart, smaller: 4 trials (the control among them) x 2 cycles.
SMALLER = [
    "dataset.num_examples=400",
    "cycles.epochs=1",
    "sae.epochs=2",
    "wandb.mode=disabled",
]


@pytest.fixture(scope="module")
def cluster(s3_endpoint):
    """A head with no CPU for work (the drivers, as Ray advises for a cluster's head) and two
    two-CPU worker nodes; the nodes' processes see the bucket's variables (as instances
    with an IAM role would)."""
    from ray.cluster_utils import Cluster

    ray_cli("get-auth-token", "--generate", timeout=60, check=True)
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_endpoint.items():
            env.setenv(key, value)
        made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        try:
            workers = [made.add_node(num_cpus=2, resources={f"node_{n}": 1}) for n in "ab"]
            made.wait_for_nodes()
        except BaseException:
            made.shutdown()
            raise
    yield made, workers
    made.shutdown()


def sae_ray(address: str, env: dict[str, str], *args: str, timeout: float = 900):
    """The CLI in its own process, joined to the cluster (this process may be a driver of
    the session's test cluster, and a process joins one cluster)."""
    return subprocess.run(
        [sys.executable, "-m", "sae_ray", *args, f"--address={address}"],
        cwd=ROOT,
        env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_local_storage_path_on_several_machines_is_refused_before_any_trial(cluster, tmp_path):
    made, _ = cluster
    runs = tmp_path / "runs"
    done = sae_ray(made.address, {}, "sweep", str(QUICKSTART), f"experiment.storage_path={runs}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout + done.stderr
    assert lines[-1].startswith("error: experiment.storage_path: ") and "3 nodes" in lines[-1]
    assert "shared_filesystem" in lines[-1]
    assert not runs.exists()  # nothing left behind


def test_the_check_accepts_a_filesystem_every_node_mounts(cluster, tmp_path):
    """The same check on the cluster's own node table, with `shared_filesystem: true`."""
    from sae_ray.cli.preflight import check_cluster
    from sae_ray.config import load

    made, _ = cluster
    nodes = made.global_state.node_table()
    assert sum(n["Alive"] for n in nodes) == 3
    cfg = load(
        QUICKSTART, [f"experiment.storage_path={tmp_path}", "experiment.shared_filesystem=true"]
    )
    check_cluster(cfg, nodes)


@pytest.fixture(scope="module")
def spread_sweep(cluster, s3_endpoint):
    """The smaller quickstart on the 3-node cluster, storage in the bucket."""
    made, _ = cluster
    done = sae_ray(
        made.address,
        s3_endpoint,
        "sweep",
        str(QUICKSTART),
        f"experiment.storage_path={BUCKET}",
        *SMALLER,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done


def test_trials_run_on_several_nodes_and_find_what_another_node_built(
    spread_sweep, s3_endpoint, monkeypatch
):

    for key, value in s3_endpoint.items():
        monkeypatch.setenv(key, value)
    results, built, specs = _each_row_and_stage_once(f"{BUCKET}/quickstart")
    nodes = {n for cell in results["nodes"] for n in cell.split(",")}
    assert len(nodes) >= 2, results[["trial_id", "cycle", "nodes"]]
    (first,) = [n for n in built if n.startswith("model-") and "parent" not in specs[n]]
    # the cycle-0 model every trial starts from: built on one node, found on another
    elsewhere = [c for c in results[results["cycle"] == 0]["nodes"] if built[first] not in c]
    assert elsewhere, (built[first], list(results["nodes"]))


def _each_row_and_stage_once(sweep: str, lost: bool = False) -> tuple[pd.DataFrame, dict, dict]:
    """results.csv with every trial's cycles once, complete, and every stage's artifact
    computed once in the whole sweep: the trials' counts add up to the artifacts built
    (the trials' own records, which a rerun of a point replays, are the drivers'), or, when
    a node was `lost`, to no more than that (a dead group's count died with it). The
    results, and each artifact's node and spec."""
    from sae_ray import storage

    results = pd.read_csv(io.BytesIO(storage.read_bytes(f"{sweep}/results.csv")))
    assert len(results) == 4 * 2 and set(results["status"]) == {"COMPLETE"}
    assert not results.duplicated(["trial_id", "cycle"]).any()
    root = f"{sweep}/artifacts"
    built, specs = {}, {}
    for name in storage.listdir(root):
        if storage.is_file(f"{root}/{name}/{BUILT}"):
            built[name] = json.loads(storage.read_bytes(f"{root}/{name}/{BUILT}"))["node"]
            specs[name] = json.loads(storage.read_bytes(f"{root}/{name}/spec.json"))
    stages = [n for n in built if not n.startswith("trial-")]
    computed = results["artifacts/computed"].sum()
    assert computed <= len(stages) if lost else computed == len(stages), (computed, len(stages))
    return results, built, specs


HELD_AT = 3  # the step whose checkpoint the first cycle-0 SAE fit holds at


def test_a_node_lost_mid_fit_and_the_sweep_completes(cluster, s3_endpoint, tmp_path, monkeypatch):
    """The first cycle-0 SAE fit stores its step-3 checkpoint and holds; its node is then
    killed as a lost machine dies. Its trial's Train run restarts the group on the node
    left, resumes the fit from the bucket, and the sweep completes: each trial-cycle row
    once, nothing published computed again. Runs last: the cluster has one node less."""
    from sae_ray import storage

    made, workers = cluster
    for key, value in s3_endpoint.items():
        monkeypatch.setenv(key, value)
    note, sweep = tmp_path / "held-on", "s3://sae-ray-test/multinode-lost/quickstart"
    faults = {HOLD_SAE_FIT_AT: f"0:{HELD_AT}", HOLD_NOTE: str(note)}
    args = ["sweep", str(QUICKSTART), f"experiment.storage_path={sweep.rsplit('/', 1)[0]}"]
    running = subprocess.Popen(
        [sys.executable, "-m", "sae_ray", *args, *SMALLER, f"sae.save_every={HELD_AT}"]
        + [f"--address={made.address}"],
        cwd=ROOT,
        env={**os.environ, **s3_endpoint, **faults, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 600
        while not note.is_file():
            assert running.poll() is None and time.monotonic() < deadline, "no fit held"
            time.sleep(0.5)
        (lost,) = [w for w in workers if w.node_id == note.read_text()]
        published = _published(sweep)
        made.remove_node(lost, allow_graceful=False)
        out, _ = running.communicate(timeout=900)
    finally:
        running.kill()
    assert running.returncode == 0, out[-4000:]
    _each_row_and_stage_once(sweep, lost=True)
    after = _published(sweep)
    # what was published before the loss was found, not built again (its record unchanged)
    assert published and {k: after.get(k) for k in published} == published
    assert len(after) > len(published)
    resumed = [
        json.loads(storage.read_bytes(f"{sweep}/artifacts/{name}/train_metrics.json"))
        for name in storage.listdir(f"{sweep}/artifacts")
        if name.startswith("sae-")
    ]
    # the held fit went on from its checkpoint in the bucket, not from step 0
    assert HELD_AT in [m["resumed_from_step"] for m in resumed]


def _published(sweep: str) -> dict[str, bytes]:
    """Each finished artifact's record of the process that built it."""
    from sae_ray import storage

    root = f"{sweep}/artifacts"
    if not storage.is_dir(root):
        return {}
    return {
        name: storage.read_bytes(f"{root}/{name}/{BUILT}")
        for name in storage.listdir(root)
        if storage.is_file(f"{root}/{name}/{DONE}")
    }
