"""Storage through pyarrow.fs: local directories and a bucket (moto's S3 server on loopback)
behave the same for everything a sweep writes and reads."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

import numpy as np
import optuna
import pandas as pd
import pyarrow as pa
import pytest

from sae_ray import storage
from sae_ray.config import Config
from sae_ray.lm.extraction import ShardWriter, read_manifest, vectors_to_arrow
from sae_ray.sweep.results import write_outputs


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_server")
    return f"s3://sae-ray-test/{uuid.uuid4().hex[:8]}"


def test_files_and_trees_round_trip(root, tmp_path, cache):
    storage.write_bytes(storage.join(root, "a", "x.json"), b'{"x": 1}')
    assert json.loads(storage.read_bytes(storage.join(root, "a", "x.json"))) == {"x": 1}
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "w.bin").write_bytes(b"\x00" * 1000)
    (tree / "sub" / "v.txt").write_text("v")
    storage.upload(tree, storage.join(root, "t"))
    assert storage.listdir(storage.join(root, "t")) == ["sub", "w.bin"]
    assert storage.is_dir(storage.join(root, "t")) and storage.is_file(
        storage.join(root, "t", "w.bin")
    )

    local = storage.local_copy(storage.join(root, "t"))
    assert (local / "sub" / "v.txt").read_text() == "v" and (local / "w.bin").stat().st_size == 1000
    assert storage.is_remote(root) == str(local).startswith(str(cache))
    storage.remove(storage.join(root, "t"))
    assert not storage.is_dir(storage.join(root, "t"))
    assert storage.listdir(storage.join(root, "t")) == []
    storage.remove(storage.join(root, "t"))  # removing what is gone is not an error


def test_a_remote_copy_is_fetched_once_and_a_partial_one_again(s3_server, tmp_path, cache):
    uri = "s3://sae-ray-test/once"
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f").write_text("1")
    storage.upload(tmp_path / "d", uri)
    first = storage.local_copy(uri)
    (tmp_path / "d" / "f").write_text("2")
    storage.upload(tmp_path / "d", uri)
    assert (storage.local_copy(uri) / "f").read_text() == "1"  # cached: artifacts never change

    (first / storage.FETCHED).unlink()  # as if the download had been killed part way
    assert (storage.local_copy(uri) / "f").read_text() == "2"


def test_missing_remote_directory_is_named(s3_server, cache):
    with pytest.raises(FileNotFoundError, match="s3://sae-ray-test/nothing-here"):
        storage.local_copy("s3://sae-ray-test/nothing-here")


def _rows():
    rows = []
    for t, (k, u) in enumerate([(4, 0.2), (8, 0.5)]):
        for cycle in (0, 1):
            rows.append(
                {
                    "trial_id": f"t{t}",
                    "cycle": cycle,
                    "sae.k": k,
                    "interp/u": u + cycle / 10,
                    "val/accuracy": 0.9,
                    "status": "COMPLETE",
                }
            )
    return rows


def test_sweep_outputs_land_in_the_bucket(s3_server, tmp_path):
    cfg = Config.model_validate(
        {
            "experiment": {"name": "outs", "storage_path": "s3://sae-ray-test/runs/"},
            "search": {"space": {"sae.k": {"type": "choice", "values": [4, 8]}}},
        }
    )
    assert cfg.sweep_uri == "s3://sae-ray-test/runs/outs"
    write_outputs(_rows(), cfg)
    written = [
        "best.json",
        "comparison.csv",
        "comparison_by_setting.csv",  # sae.k is a choice
        "optuna.db",
        "results.csv",
    ]
    assert storage.listdir(cfg.sweep_uri) == written
    results = pd.read_csv(pa.BufferReader(storage.read_bytes(f"{cfg.sweep_uri}/results.csv")))
    assert len(results) == 4 and set(results["trial_id"]) == {"t0", "t1"}
    best = json.loads(storage.read_bytes(f"{cfg.sweep_uri}/best.json"))
    assert best["best"]["trial_id"] == "t1"
    db = tmp_path / "optuna.db"
    db.write_bytes(storage.read_bytes(f"{cfg.sweep_uri}/optuna.db"))
    study = optuna.load_study(study_name="outs", storage=f"sqlite:///{db}")
    assert study.best_trial.params == {"sae.k": 8}


def test_a_truncated_shard_in_the_bucket_is_refused(s3_server, tmp_path):
    writer = ShardWriter(tmp_path / "tokens", "tokens", 8, "float32", rows_per_shard=50)
    x = np.random.default_rng(0).standard_normal((120, 8)).astype(np.float32)
    for start in range(0, 120, 40):
        ids = pa.array(np.arange(start, start + 40))
        writer.write(
            pa.record_batch({"example_id": ids, "x": vectors_to_arrow(x[start : start + 40])})
        )
    manifest = writer.close()
    uri = "s3://sae-ray-test/acts/tokens"
    storage.upload(tmp_path / "tokens", uri)
    assert read_manifest(uri, verify=True).rows == 120
    shard = f"{uri}/{manifest.files[1]['path']}"
    storage.write_bytes(shard, storage.read_bytes(shard)[:-100])
    with pytest.raises(ValueError, match=manifest.files[1]["path"]):
        read_manifest(uri, verify=True)


# ---------------------------------------------------- artifacts: need Ray for the lease


@pytest.mark.ray
def test_bucket_artifacts_are_computed_once_and_read_anywhere(
    ray_cluster, s3_server, cache, monkeypatch
):
    from sae_ray.storage.artifacts import DONE, ArtifactStore

    root = f"s3://sae-ray-test/{uuid.uuid4().hex[:8]}/artifacts"
    calls = []

    def compute(out):
        calls.append(1)
        time.sleep(1.0)  # long enough for the other threads to queue on the lease
        (out / "weights.bin").write_bytes(b"w" * 4096)

    arts = []
    threads = [
        threading.Thread(
            target=lambda: arts.append(ArtifactStore(root).get_or_compute("sae", {"k": 4}, compute))
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({a.location for a in arts}) == 1
    art = arts[0]
    assert art.location.startswith(root) and storage.is_file(art.uri(DONE))
    assert ArtifactStore(root).count("sae") == 1
    assert (art.local() / "weights.bin").read_bytes() == b"w" * 4096  # the producer's copy

    monkeypatch.setenv("SAE_RAY_CACHE", str(cache.parent / "other-node"))
    again = ArtifactStore(root).get_or_compute("sae", {"k": 4}, compute)
    assert len(calls) == 1 and (again.local() / "weights.bin").stat().st_size == 4096
    assert str(again.local()).startswith(str(cache.parent / "other-node"))  # downloaded


@pytest.mark.ray
def test_a_failed_computation_leaves_nothing_marked_complete(ray_cluster, s3_server, cache):
    from sae_ray.storage.artifacts import ArtifactStore

    store = ArtifactStore(f"s3://sae-ray-test/{uuid.uuid4().hex[:8]}")

    def crash(out):
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.get_or_compute("model", {"a": 1}, crash)
    assert store.count("model") == 0
    art = store.get_or_compute("model", {"a": 1}, lambda out: (out / "ok").write_text("1"))
    assert store.count("model") == 1 and (art.local() / "ok").read_text() == "1"


@pytest.mark.ray
def test_a_lease_is_renewed_while_held_and_expires_when_its_holder_is_gone(ray_cluster):
    import ray

    from sae_ray.storage.leases import lease, lease_table

    root = f"s3://leases/{uuid.uuid4().hex}"
    got_in = []

    def contender():
        with lease(root, "k", ttl=1.0, poll=0.1):
            got_in.append(time.monotonic())

    with lease(root, "k", ttl=1.0, poll=0.1):
        started = time.monotonic()
        other = threading.Thread(target=contender)
        other.start()
        time.sleep(2.5)  # over twice the ttl: only renewal keeps the contender out
        assert not got_in
        released = time.monotonic()
    other.join(timeout=30)
    assert got_in and got_in[0] >= released > started

    table = lease_table(root)
    assert ray.get(table.acquire.remote("dead", "crashed-holder", 0.5))
    assert not ray.get(table.acquire.remote("dead", "next", 0.5))
    time.sleep(0.7)  # the crashed holder never renews
    assert ray.get(table.acquire.remote("dead", "next", 0.5))


@pytest.mark.ray
def test_a_trial_takes_back_the_lease_its_dead_worker_group_left(ray_cluster):
    """A group on a lost node never releases its lease; the trial's restarted group (the
    same holder) takes it at once, anyone else only once it has expired."""
    import ray

    from sae_ray.storage.leases import lease, lease_table

    root = f"s3://leases/{uuid.uuid4().hex}"
    table = lease_table(root)
    assert ray.get(table.acquire.remote("sae-1", "sweep/trial_a", 30.0))  # then it died
    with lease(root, "sae-1", wait=False, holder="sweep/trial_b") as held:
        assert not held  # the stale lease is live for 30 s more
    started = time.monotonic()
    with lease(root, "sae-1", holder="sweep/trial_a") as held:
        assert held and time.monotonic() - started < 5
    with lease(root, "sae-1", wait=False, holder="sweep/trial_b") as held:
        assert held  # released when the restarted group's block ended


@pytest.mark.ray
def test_the_lease_table_outlives_the_placement_group_of_the_trial_that_started_it(ray_cluster):
    """Trials run in Tune's placement groups, which capture child actors by default."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from sae_ray.storage.leases import lease_table

    root = f"s3://leases/{uuid.uuid4().hex}"

    @ray.remote(num_cpus=0.1)
    def trial() -> bool:
        return ray.get(lease_table(root).acquire.remote("k", "trial", 60.0))

    group = placement_group([{"CPU": 0.1}])
    ray.get(group.ready(), timeout=60)
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    assert ray.get(trial.options(scheduling_strategy=strategy).remote(), timeout=60)
    remove_placement_group(group)
    time.sleep(1)
    # still the same table, lease and all
    assert not ray.get(lease_table(root).acquire.remote("k", "other", 60.0), timeout=30)


def test_the_s3_variables_stay_in_the_tests_that_ask_for_them(s3_endpoint):
    """The local S3's credentials and endpoint are not left in the environment of the
    session's other tests (a real bucket would be reached with fake keys, or the reverse)."""
    assert not {k for k, v in s3_endpoint.items() if os.environ.get(k) == v}
