"""Shared fixtures: one tiny dataset for fast tests; one Ray cluster and one finished
quickstart sweep for the end-to-end tests (started once per session, only if needed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "sweeps" / "quickstart.yaml"


@pytest.fixture(scope="session")
def topics():
    from sae_ray.config import Dataset
    from sae_ray.data import load_text_data

    return load_text_data(Dataset(num_examples=200), seed=0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local 2-CPU Ray cluster for every end-to-end test (dashboard on, as in use)."""
    import ray

    # Train workers unpickle loop functions defined in test modules: put tests/ on their path.
    path = os.pathsep.join([str(ROOT / "tests"), str(ROOT)])
    ray.init(
        num_cpus=2,
        include_dashboard=True,
        log_to_driver=False,
        object_store_memory=1 << 30,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def quickstart_sweep(ray_cluster, tmp_path_factory):
    """The README's quickstart sweep, run once for real through the CLI entry point."""
    from sae_ray import cli

    storage = tmp_path_factory.mktemp("runs")
    code = cli.main(["sweep", str(QUICKSTART), f"experiment.storage_path={storage}"])
    assert code == 0
    return storage / "quickstart"
