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

import pandas as pd
import pytest

from sae_ray.storage.artifacts import BUILT
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
    """A one-CPU head (the drivers) and two two-CPU worker nodes; the nodes' processes see
    the bucket's variables (as instances with an IAM role would)."""
    from ray.cluster_utils import Cluster

    ray_cli("get-auth-token", "--generate", timeout=60, check=True)
    with pytest.MonkeyPatch.context() as env:
        for key, value in s3_endpoint.items():
            env.setenv(key, value)
        made = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
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
    from sae_ray import storage

    for key, value in s3_endpoint.items():
        monkeypatch.setenv(key, value)
    results = pd.read_csv(io.BytesIO(storage.read_bytes(f"{BUCKET}/quickstart/results.csv")))
    assert len(results) == 4 * 2 and set(results["status"]) == {"COMPLETE"}
    nodes = {n for cell in results["nodes"] for n in cell.split(",")}
    assert len(nodes) >= 2, results[["trial_id", "cycle", "nodes"]]
    root = f"{BUCKET}/quickstart/artifacts"
    built, specs = {}, {}
    for name in storage.listdir(root):
        if storage.is_file(f"{root}/{name}/{BUILT}"):
            built[name] = json.loads(storage.read_bytes(f"{root}/{name}/{BUILT}"))["node"]
            specs[name] = json.loads(storage.read_bytes(f"{root}/{name}/spec.json"))
    # every stage's artifact computed once in the whole sweep: the trials' counts add up to
    # it (the trials' own records, which a rerun of a point replays, are the drivers')
    stages = [n for n in built if not n.startswith("trial-")]
    assert results["artifacts/computed"].sum() == len(stages)
    (first,) = [n for n in built if n.startswith("model-") and "parent" not in specs[n]]
    # the cycle-0 model every trial starts from: built on one node, found on another
    elsewhere = [c for c in results[results["cycle"] == 0]["nodes"] if built[first] not in c]
    assert elsewhere, (built[first], list(results["nodes"]))
