"""A node lost, or drained for preemption, in the middle of an SAE fit, on a simulated cluster.

A head with no CPU for work and two two-CPU nodes as separate raylets on this host
(`ray.cluster_utils.Cluster`), a local S3 (moto) for the storage, the smaller quickstart
joined with `--address`. The first cycle-0 SAE fit to store its step-3 checkpoint holds
there (`SAE_RAY_HOLD_SAE_FIT_AT`) and its node is then:

    python cluster/node_loss.py kill     # killed, as a lost machine dies
    python cluster/node_loss.py drain    # drained for preemption (Ray's drain API, the
                                         # deadline DEADLINE s away), then killed at it
    python cluster/node_loss.py none     # left alone: the baseline on 3 nodes
    python cluster/node_loss.py one      # the baseline on one 4-CPU node

The sweep's console with a clock, its exit and wall time, then results.csv's rows. Leaves
nothing running. `tests/test_multinode.py` asserts the `kill` case; this is the rest.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "s3://sae-ray-node-loss/runs"
SMALLER = ["dataset.num_examples=400", "cycles.epochs=1", "sae.epochs=2", "wandb.mode=disabled"]
DEADLINE = 10  # seconds from the drain notice to the node's end (a spot VM gets 30-120)


def drain(address: str, node_id: str) -> None:
    """What a cloud's preemption notice becomes on a Ray cluster (the autoscaler's call)."""
    import ray._raylet
    from ray.core.generated import autoscaler_pb2

    accepted, why = ray._raylet.GcsClient(address=address).drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot preemption",
        int(time.time() * 1000) + DEADLINE * 1000,
    )
    assert accepted, why


def main(mode: str) -> int:
    import boto3
    import pandas as pd
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

    from sae_ray.trial.sae_fit import HOLD_NOTE, HOLD_SAE_FIT_AT

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(
        AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    boto3.client("s3").create_bucket(Bucket=BUCKET.split("/")[2])
    one = mode == "one"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4 if one else 0})
    nodes = [] if one else [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    note = Path(tempfile.mkdtemp()) / "held-on"
    faults = {HOLD_SAE_FIT_AT: "0:3", HOLD_NOTE: str(note)} if mode in ("kill", "drain") else {}
    start = time.time()
    sweep = subprocess.Popen(
        [sys.executable, "-m", "sae_ray", "sweep", "sweeps/quickstart.yaml"]
        + [f"--address={cluster.address}", f"experiment.storage_path={BUCKET}", *SMALLER]
        + ["sae.save_every=3"],
        cwd=ROOT,
        env={**os.environ, **faults, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )

    def say(line: str) -> None:
        print(f"[{time.time() - start:6.1f}] {line}", flush=True)

    def fault() -> None:
        while not note.is_file():
            if sweep.poll() is not None:
                return
            time.sleep(0.5)
        (node,) = [n for n in nodes if n.node_id == note.read_text()]
        if mode == "drain":
            say(f"draining node {node.node_id[:12]} for preemption, deadline {DEADLINE} s")
            drain(cluster.address, node.node_id)
            time.sleep(DEADLINE)
        say(f"killing node {node.node_id[:12]}")
        cluster.remove_node(node, allow_graceful=False)

    def read() -> None:
        for line in sweep.stdout:
            say(line.rstrip())

    threading.Thread(target=read, daemon=True).start()
    if faults:
        threading.Thread(target=fault, daemon=True).start()
    try:
        code: int | str = sweep.wait(timeout=900)
    except subprocess.TimeoutExpired:
        code = "TIMEOUT"
        sweep.kill()
    print(f"{mode}: exit {code} after {time.time() - start:.1f} s", flush=True)
    try:
        from sae_ray import storage

        rows = pd.read_csv(io.BytesIO(storage.read_bytes(f"{BUCKET}/quickstart/results.csv")))
        print(rows[["trial_id", "cycle", "status", "artifacts/computed", "nodes"]].to_string())
    except Exception as err:  # noqa: BLE001 - a hung sweep wrote none
        print(f"no results.csv ({err})")
    cluster.shutdown()
    server.stop()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "kill"))
