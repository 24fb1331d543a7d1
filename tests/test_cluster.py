"""The cluster files parse and pass the checks Ray offers offline; none opens the dashboard,
GCS or client ports to the world."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_configs_pass_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CLUSTER / name).read_text())
    validate_config(prepare_config(raw))  # the checks `ray up` runs before it starts anything
    types = raw["available_node_types"]
    assert types[raw["head_node_type"]]["resources"] == {"CPU": 0}
    assert {"gpu_h100"} <= set(types) and len(types) >= 3  # head, mid-size GPU, H100
    starts = " ".join(raw["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in starts and "RAY_AUTH_MODE=token" in starts


def test_kuberay_manifests_are_ray_io_v1_and_stay_inside_the_cluster():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    job = yaml.safe_load((CLUSTER / "kuberay" / "rayjob.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["entrypoint"].startswith("sae-ray sweep ")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
        assert spec["authOptions"]["mode"] == "token"
        gpu = spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
        assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert env["env_vars"]["WANDB_MODE"] == "offline"


def test_slurm_script_is_valid_bash():
    script = CLUSTER / "slurm_sweep.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--dashboard-host=127.0.0.1" in text and "RAY_AUTH_MODE=token" in text


def test_no_cluster_file_opens_ports_to_the_world():
    for path in CLUSTER.rglob("*"):
        if path.is_file() and path.suffix != ".md":
            # what the files configure, not what their comments warn against
            text = "\n".join(line.split("#")[0] for line in path.read_text().splitlines())
            assert "0.0.0.0/0" not in text, path
            assert "LoadBalancer" not in text and "NodePort" not in text, path


@pytest.mark.parametrize(
    ("address", "env", "nodes", "expected"),
    [
        (None, {}, 1, "0"),  # a cluster started here, one machine: no watcher
        (None, {}, 3, None),  # joined a cluster of several machines: Ray's default
        ("10.0.0.1:6379", {}, 1, None),  # an address: someone else's cluster
        (None, {"RAY_ADDRESS": "10.0.0.1:6379"}, 1, None),
        (None, {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "1"}, 1, "1"),  # the user's value wins
    ],
)
def test_preemption_watcher_only_off_on_a_local_cluster(monkeypatch, address, env, nodes, expected):
    import ray

    from sae_ray.cli import ray_session

    for key in ("RAY_ADDRESS", ray_session.PREEMPTION_WATCHER):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "nodes", lambda: [{}] * nodes)
    ray_session.connect(address, verbose=True)  # verbose: no console settings to undo
    assert os.environ.get(ray_session.PREEMPTION_WATCHER) == expected


def _node(cpu: float, gpu: float = 0, alive: bool = True) -> dict:
    return {"Alive": alive, "Resources": {"CPU": cpu, **({"GPU": gpu} if gpu else {})}}


def test_a_local_storage_path_on_several_machines_is_refused(tmp_path):
    """Each node would write its own disk: results, artifacts and checkpoints scattered."""
    from sae_ray.cli.preflight import check_cluster
    from sae_ray.config import Config, ConfigError

    def cfg(**experiment):
        return Config.model_validate(
            {"experiment": {"name": "x", "storage_path": str(tmp_path), **experiment}}
        )

    check_cluster(cfg(), [_node(2), _node(2, alive=False)])  # one machine alive
    with pytest.raises(ConfigError, match=r"^experiment.storage_path: .* has 2 nodes"):
        check_cluster(cfg(), [_node(1), _node(2)])
    check_cluster(cfg(shared_filesystem=True), [_node(1), _node(2)])  # NFS on every node
    check_cluster(cfg(storage_path="s3://bucket/runs"), [_node(1), _node(2)])


def test_a_worker_larger_than_every_node_is_refused(tmp_path):
    from sae_ray.cli.preflight import check_cluster
    from sae_ray.config import Config, ConfigError

    def cfg(**resources):
        return Config.model_validate(
            {"experiment": {"name": "x", "storage_path": "s3://b/r"}, "resources": resources}
        )

    nodes = [_node(0), _node(2), _node(2)]  # a CPU-less head, two 2-CPU workers: 4 in all
    check_cluster(cfg(num_workers=2, cpus_per_worker=2), nodes)  # one per node
    with pytest.raises(ConfigError, match=r"^resources.cpus_per_worker: 3 CPUs per worker"):
        check_cluster(cfg(num_workers=1, cpus_per_worker=3), nodes)
    with pytest.raises(ConfigError, match=r"^resources.use_gpu: no node"):
        check_cluster(cfg(use_gpu=True), nodes)
    check_cluster(cfg(use_gpu=True), [*nodes, _node(8, gpu=1)])


@pytest.mark.parametrize("placement", ["pack", "spread"])
def test_placement_is_ray_trains_placement_strategy(placement, tmp_path):
    from sae_ray.config import Resources
    from sae_ray.distributed.trainer import torch_trainer

    trainer = torch_trainer(lambda c: None, {}, Resources(placement=placement), "t", tmp_path)
    assert trainer.scaling_config.placement_strategy == placement.upper()


def test_an_autoscaling_cluster_is_sized_by_what_it_may_grow_to(monkeypatch, tmp_path):
    """A cluster that scales from zero (the launcher YAMLs: a CPU-less head) has no worker
    when the sweep starts: sized by its nodes then, the sweep would refuse to run."""
    import ray
    from ray.core.generated import autoscaler_pb2

    from sae_ray.cli.preflight import check_cluster
    from sae_ray.config import Config, ConfigError
    from sae_ray.sweep import cluster
    from sae_ray.sweep.tuner import max_concurrent_trials

    group = autoscaler_pb2.NodeGroupConfig(resources={"CPU": 2}, max_count=3, name="cpu2")
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[group])
    monkeypatch.setattr(ray._private.state.state, "get_cluster_config", lambda: config)
    monkeypatch.setattr(ray, "nodes", lambda: [_node(0)])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 0.0})
    assert cluster.capacity()["CPU"] == 6  # three 2-CPU nodes at most
    cfg = Config.model_validate({"experiment": {"name": "x", "storage_path": "s3://b/r"}})
    assert max_concurrent_trials(cfg, cluster.capacity()) == 5  # (6 - 1) / 1 CPU a trial
    check_cluster(cfg, cluster.nodes())  # its workers fit the node type to come
    local = cfg.model_copy(
        update={"experiment": cfg.experiment.model_copy(update={"storage_path": str(tmp_path)})}
    )
    with pytest.raises(ConfigError, match="1 nodes \\(more from the autoscaler\\)"):
        check_cluster(local, cluster.nodes())


@pytest.mark.parametrize(
    "types, grows",
    [
        ({"ab12": "node_ab12"}, False),  # every head's monitor, read-only: no node types
        ({"ab12": "ray.head.default", "cd34": "cpu2"}, True),  # launched from a config
    ],
)
def test_only_an_autoscaler_with_node_types_makes_the_cluster_grow(monkeypatch, types, grows):
    """Every Ray head runs the autoscaler's monitor and publishes its status, also a
    local cluster that can never grow: that one must still be sized by what it has."""
    import json

    import ray.experimental.internal_kv as kv

    from sae_ray.sweep import cluster

    status = {"autoscaler_report": {"node_type_mapping": types, "active_nodes": {}}}
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key: json.dumps(status).encode())
    monkeypatch.setattr(cluster, "node_groups", lambda: [])
    assert cluster.autoscaled() is grows
