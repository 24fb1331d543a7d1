"""Reproduces the open part of issue 36: a node lost mid-sweep on a simulated cluster.

A one-CPU head and two two-CPU nodes as separate raylets (`ray.cluster_utils.Cluster`), a
local S3 (moto) for the storage, the smaller quickstart joined with `--address`; node a is
killed (`remove_node(allow_graceful=False)`) DELAY seconds after the first console line that
holds TRIGGER. The sweep's own console, then its exit (or TIMEOUT), then results.csv's rows.

    python cluster/node_loss_repro.py 20 700 started       # killed in cycle 0: hangs today
    python cluster/node_loss_repro.py 3 700 "cycle 1/2"   # killed after cycle 0: completes
    python cluster/node_loss_repro.py 0 700 NEVER         # no kill: the baseline

Seen (issue 36's note): killed in cycle 0, 4 trials stay "running" with 3.0/3.0 CPUs held by
their worker groups, one placement group pending and their SAE fits' Ray Data reads waiting
for a CPU. Leaves nothing running; not a test (minutes, and it may hang until TIMEOUT).
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "s3://sae-ray-node-loss/runs"
SMALLER = ["dataset.num_examples=400", "cycles.epochs=1", "sae.epochs=2", "wandb.mode=disabled"]


def main(delay: float, timeout: int, trigger: str) -> int:
    import boto3
    import pandas as pd
    from moto.server import ThreadedMotoServer
    from ray.cluster_utils import Cluster

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
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    cluster.wait_for_nodes()
    start = time.time()
    sweep = subprocess.Popen(
        [sys.executable, "-m", "sae_ray", "sweep", "sweeps/quickstart.yaml"]
        + [f"--address={cluster.address}", f"experiment.storage_path={BUCKET}", *SMALLER],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    armed = threading.Event()

    def kill() -> None:
        time.sleep(delay)
        print(f"[{time.time() - start:6.1f}] killing node {nodes[0].node_id[:12]}", flush=True)
        cluster.remove_node(nodes[0], allow_graceful=False)

    def read() -> None:
        for line in sweep.stdout:
            print(f"[{time.time() - start:6.1f}] {line.rstrip()}", flush=True)
            if trigger in line and not armed.is_set():
                armed.set()
                threading.Thread(target=kill, daemon=True).start()

    threading.Thread(target=read, daemon=True).start()
    try:
        code: int | str = sweep.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = "TIMEOUT"
        sweep.kill()
    print(f"exit {code} after {time.time() - start:.1f} s", flush=True)
    try:
        from sae_ray import storage

        rows = pd.read_csv(io.BytesIO(storage.read_bytes(f"{BUCKET}/quickstart/results.csv")))
        print(rows[["trial_id", "cycle", "status", "artifacts/computed"]].to_string())
    except Exception as err:  # noqa: BLE001 - a hung sweep wrote none
        print(f"no results.csv ({err})")
    cluster.shutdown()
    server.stop()
    return 0 if code == 0 else 1


if __name__ == "__main__":
    delay, timeout, trigger = float(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sys.exit(main(delay, timeout, trigger))
