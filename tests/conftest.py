"""Shared fixtures: one tiny dataset for fast tests; one Ray cluster and one finished
quickstart sweep for the end-to-end tests (started once per session, only if needed)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
# Ray reads its auth mode when imported: the test cluster (like every local cluster since Ray
# 2.59) uses token authentication, so this process must say so before anything imports ray.
os.environ["RAY_AUTH_MODE"] = "token"
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"
PLANTED_KEY = "local-0123456789abcdef0123456789abcdef01234567"  # W&B key format, fake


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The node's Prometheus endpoint in the shared test cluster. Kept in the environment: test
# modules import this file again as `tests.conftest`, and both copies must agree.
METRICS_PORT = int(os.environ.setdefault("SAE_RAY_TEST_METRICS_PORT", str(_free_port())))


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 (moto's server mode, loopback only) with one bucket, `sae-ray-test`, for
    the session: the AWS variables that reach it, not set in this process (`s3_server`
    sets them for one test; jobs are handed them in their runtime_env)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="sae-ray-test")
    yield env
    server.stop()


@pytest.fixture
def s3_server(s3_endpoint, monkeypatch):
    """The local S3's variables set in this process for one test (what pyarrow, boto3 and
    Ray read), and restored after it."""
    for key, value in s3_endpoint.items():
        monkeypatch.setenv(key, value)
    return s3_endpoint


@pytest.fixture(scope="session")
def topics():
    from sae_ray.config import Dataset
    from sae_ray.lm.text_data import load_text_data

    return load_text_data(Dataset(num_examples=200), seed=0)


def ray_env() -> dict[str, str]:
    """The environment of the `ray` CLI calls: this venv's scripts first on PATH, so the head
    and the jobs it runs find `sae-ray` and the same Python; token authentication on (local
    clusters use it since Ray 2.59, and the job CLI needs to be told)."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, "RAY_AUTH_MODE": "token"}


def ray_cli(*args: str, env_extra: dict[str, str] | None = None, **kwargs):
    ray = str(Path(sys.executable).parent / "ray")
    env = {**ray_env(), **(env_extra or {})}
    return subprocess.run([ray, *args], env=env, capture_output=True, text=True, **kwargs)


def stop_cluster(temp_dir: Path) -> None:
    """Stop the test cluster's processes, and only them: each Ray process of it names its
    own temp dir in its command line (`ray stop` would stop every Ray on the machine, a
    user's own cluster included)."""
    import psutil

    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = proc.info["cmdline"] or []
        except psutil.Error:
            continue
        if proc.pid != os.getpid() and any(str(temp_dir) in part for part in cmdline):
            mine.append(proc)
            # its children too: the raylet's agents and workers rename themselves (ray::...)
            with contextlib.suppress(psutil.Error):
                mine += proc.children(recursive=True)
    mine = list({proc.pid: proc for proc in mine}.values())
    for proc in mine:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    _, alive = psutil.wait_procs(mine, timeout=10)  # then killed: only a test cluster
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_cluster():
    """One 2-CPU Ray head started the way users start one (`ray start --head`, on loopback,
    dashboard on), which every end-to-end test joins as a driver. It keeps its files (and
    its workers' temp files: W&B's among them) in a temp dir of its own, and only its own
    processes are stopped at the end."""
    import ray

    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    # Short: Ray's socket paths live under it (a Unix socket path has ~100 characters).
    temp_dir = Path(tempfile.mkdtemp(prefix="sae-ray-t-", dir="/tmp"))
    (temp_dir / "tmp").mkdir()
    ray_cli("get-auth-token", "--generate", timeout=60, check=True)  # ~/.ray/auth_token
    started = ray_cli(
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",  # the job agent: not the shared default
        f"--metrics-export-port={METRICS_PORT}",
        f"--object-store-memory={1 << 30}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        timeout=300,
        env_extra={"TMPDIR": str(temp_dir / "tmp")},  # the workers' temp files go there
    )
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        # Train workers unpickle loop functions defined in test modules: tests/ on their path.
        path = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
        ray.init(
            address=f"127.0.0.1:{port}",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    except BaseException:
        stop_cluster(temp_dir)  # never leave a head behind
        raise
    ray.dashboard_address = f"http://127.0.0.1:{dashboard}"
    ray.gcs_address = f"127.0.0.1:{port}"
    yield ray
    ray.shutdown()
    stop_cluster(temp_dir)


def submit_quickstart(
    ray, workdir: Path, env_vars: dict[str, str], storage_path: str, extra: tuple[str, ...] = ()
) -> str:
    """`ray job submit --working-dir .` of the quickstart (with `extra` overrides), with the
    cluster's runtime_env file plus `env_vars`, as users submit it; asserts the job
    SUCCEEDED and returns its log."""
    import yaml

    runtime_env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    runtime_env["env_vars"].update(env_vars)
    env_file = workdir / "runtime_env.yaml"
    env_file.write_text(yaml.safe_dump(runtime_env))
    submitted = ray_cli(
        "job",
        "submit",
        f"--address={ray.dashboard_address}",
        f"--working-dir={ROOT}",
        f"--runtime-env={env_file}",
        "--",
        "sae-ray",
        "sweep",
        "sweeps/quickstart.yaml",  # relative: read from the uploaded working dir
        f"experiment.storage_path={storage_path}",
        *extra,
        timeout=1800,
    )
    log = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0 and re.search(r"Job '\w+' succeeded", log), log[-4000:]
    return log


def ray_session_dir() -> Path:
    """The test cluster's session folder in Ray's temp folder (where Tune puts trials'
    working directories)."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path())


@pytest.fixture(scope="session")
def quickstart_sweep(ray_cluster, tmp_path_factory):
    """The README's quickstart, typed as a user types it: `sae-ray sweep
    sweeps/quickstart.yaml` in a fresh working directory, with the YAML's relative
    `storage_path: ./runs`, joining the test cluster through RAY_ADDRESS. Must exit 0.

    Returns `<workdir>/runs/quickstart`; the console output is `<workdir>/console.log`."""
    import shutil

    workdir = tmp_path_factory.mktemp("user")
    (workdir / "sweeps").mkdir()
    shutil.copy(QUICKSTART, workdir / "sweeps" / "quickstart.yaml")
    # A W&B key in the user's environment: tests/test_security.py greps everything the sweep
    # wrote, and its console, for it.
    env = {**ray_env(), "RAY_ADDRESS": ray_cluster.gcs_address, "WANDB_API_KEY": PLANTED_KEY}
    done = subprocess.run(
        [str(Path(sys.executable).parent / "sae-ray"), "sweep", "sweeps/quickstart.yaml"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    console = done.stdout + done.stderr
    (workdir / "console.log").write_text(console)
    assert done.returncode == 0, console[-4000:]
    return workdir / "runs" / "quickstart"
