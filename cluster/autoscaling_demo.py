"""A sweep on a cluster that scales from zero, on one machine: Ray's fake multi-node
provider (`ray.cluster_utils.AutoscalingCluster`) runs the real autoscaler, which launches
and terminates raylets as nodes from `available_node_types`, as the launcher YAMLs here
declare them (a head that runs no trials, a worker type with `min_workers: 0`).

    python cluster/autoscaling_demo.py            # ~5 min on 2 CPUs

It prints the cluster's nodes as the sweep asks for workers, runs, and goes idle: nodes
launched while trials wait, trials running on them, idle nodes terminated. Its end runs
`ray stop --force` (the fake provider's own shutdown), which stops every Ray process on
the machine: not a test, and never beside another Ray cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
WORKER = {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2}
SMALLER = ["dataset.num_examples=400", "cycles.epochs=1", "sae.epochs=2", "wandb.mode=disabled"]


def watch(stop: threading.Event, seen: list[tuple[float, int, float]], start: float) -> None:
    import ray

    while not stop.is_set():
        alive = [n for n in ray.nodes() if n["Alive"]]
        cpus = sum(n["Resources"].get("CPU", 0) for n in alive)
        if not seen or seen[-1][1:] != (len(alive), cpus):
            seen.append((round(time.time() - start, 1), len(alive), cpus))
            print(f"[{seen[-1][0]:6.1f} s] {len(alive)} nodes, {cpus:g} CPUs", flush=True)
        stop.wait(2.0)


# The fake provider's cluster config (`AutoscalingCluster` reads an example.yaml that Ray's
# wheels do not ship): what `ray up` would read, with the node types below.
BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {
        "type": "fake_multinode",
        "use_node_id_as_ip": True,
        "disable_node_updaters": True,
        "disable_launch_config_check": True,
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "docker": {},
    "auth": {"ssh_user": "ubuntu"},
    **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
    **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands")},
    **{k: [] for k in ("worker_start_ray_commands", "cluster_synced_files")},
    **{k: [] for k in ("rsync_exclude", "rsync_filter")},
    "file_mounts": {},
    "file_mounts_sync_continuously": False,
}


def fake_cluster():
    from ray.cluster_utils import AutoscalingCluster

    class Fake(AutoscalingCluster):
        def _generate_config(self, head_resources, worker_node_types, **kwargs):
            config = {**BASE, **kwargs}
            config["available_node_types"] = {
                **worker_node_types,
                "ray.head.default": {
                    "resources": dict(head_resources),
                    "node_config": {},
                    "max_workers": 0,
                },
            }
            return config

    return Fake(
        head_resources={"CPU": 1},
        worker_node_types={"cpu2": WORKER},
        idle_timeout_minutes=0.5,
    )


def main() -> int:
    import ray

    # the fake provider starts nodes with the `ray` command: this environment's
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    cluster = fake_cluster()
    cluster.start()
    seen: list[tuple[float, int, float]] = []
    stop = threading.Event()
    start = time.time()
    try:
        ray.init(address="auto", log_to_driver=False)
        watcher = threading.Thread(target=watch, args=(stop, seen, start), daemon=True)
        watcher.start()
        runs = Path(tempfile.mkdtemp(prefix="sae-ray-autoscale-"))
        sweep = subprocess.run(
            [
                *(sys.executable, "-m", "sae_ray", "sweep", "sweeps/quickstart.yaml"),
                "--address=auto",
                f"experiment.storage_path={runs}",
                "experiment.shared_filesystem=true",  # every fake node is this machine
                *SMALLER,
            ],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=1800,
        )
        ended = round(time.time() - start, 1)
        print(f"[{ended:6.1f} s] sweep ended: exit {sweep.returncode}", flush=True)
        if sweep.returncode:
            print(sweep.stdout[-3000:], sweep.stderr[-3000:], sep="\n")
        deadline = time.time() + 180  # idle nodes go after idle_timeout_minutes
        while time.time() < deadline and seen[-1][1] > 1:
            time.sleep(2.0)
        stop.set()
        results = pd.read_csv(runs / "quickstart" / "results.csv")
        nodes = {n for cell in results["nodes"] for n in str(cell).split(",")}
        summary = {
            "sweep_exit": sweep.returncode,
            "sweep_s": ended,
            "rows": len(results),
            "complete": int((results["status"] == "COMPLETE").sum()),
            "trial_nodes": sorted(nodes),
            "most_nodes": max(n for _, n, _ in seen),
            "nodes_at_end": seen[-1][1],
            "timeline": seen,
        }
        print(json.dumps(summary))
        return 0 if sweep.returncode == 0 and summary["nodes_at_end"] == 1 else 1
    finally:
        stop.set()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    sys.exit(main())
