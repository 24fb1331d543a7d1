"""The ranks of a trial's Train run act as one: a stage split over 2 gloo ranks (real
processes, no Ray) publishes the same artifact one process does, and a stage already in
the store is found by every rank without computing."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sae_ray.config import Config
from sae_ray.lm.extraction import read_manifest
from sae_ray.lm.models import build_classifier, forbidden, load_classifier
from sae_ray.lm.text_data import load_text_data
from sae_ray.storage.artifacts import Artifact, ArtifactStore
from sae_ray.trial import stages
from tests.test_ddp import _free_port

SPLITS = ("train", "validation", "test")


def _trial(root) -> stages.Trial:
    cfg = Config.model_validate(
        {
            "experiment": {"name": "t", "storage_path": str(root)},
            "model": {"max_length": 32},
            "dataset": {"num_examples": 300},  # 210 train rows: 4 batches, split 2 + 2
        }
    )
    data = load_text_data(cfg.dataset, seed=0)
    return stages.Trial(cfg, data, ArtifactStore(root / "store"), str(root / "runs"), "per_class")


def _extract(trial: stages.Trial) -> Artifact:
    clf = build_classifier("tiny-gpt2", 4, trial.data.splits["train"].texts, 0, 32)
    return stages.activations(trial, clf, Artifact("model", "m0"), -1)


def _rank(rank, world, port, root, outs):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    trial = _trial(root)
    first = _extract(trial)
    again = _extract(trial)  # found in the store by every rank: nothing computed
    found = {"first": first.location, "again": again.location, "n": trial.store.computed}
    torch.save(found, outs[rank])
    dist.destroy_process_group()


def _table(location: str, split: str, kind: str) -> dict[str, np.ndarray]:
    root = f"{location}/{split}/{kind}"
    table = pq.read_table(read_manifest(root, verify=True).paths(root))
    return {
        name: np.stack(table[name].to_numpy(zero_copy_only=False)) for name in table.schema.names
    }


def test_extraction_over_two_ranks_writes_what_one_process_writes(tmp_path):
    one = _extract(_trial(tmp_path / "one"))
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(_rank, args=(2, _free_port(), tmp_path / "two", outs), nprocs=2, join=True)
    results = [torch.load(o) for o in outs]
    assert results[0]["first"] == results[1]["first"] == results[0]["again"]
    assert [r["n"] for r in results] == [1, 0]  # rank 0 published it, once
    two = results[0]["first"]
    shards = read_manifest(f"{two}/train/tokens").files
    assert {f["path"].split("-")[1] for f in shards} == {"r000", "r001"}  # both ranks wrote
    for split in SPLITS:
        kinds = ("sequences",) if split == "test" else ("tokens", "sequences")
        for kind in kinds:
            a, b = _table(one.location, split, kind), _table(two, split, kind)
            assert a.keys() == b.keys()
            for name in a:
                np.testing.assert_array_equal(a[name], b[name], err_msg=f"{split}/{kind}/{name}")


def test_slices_cover_every_example_once_on_batch_boundaries():
    for n in (1, 63, 64, 65, 300, 1000):
        for world in (1, 2, 3, 4):
            parts = [stages.slice_rows(n, world, r) for r in range(world)]
            np.testing.assert_array_equal(np.concatenate(parts), np.arange(n))
            assert all(p[0] % stages.EXTRACT_BATCH == 0 for p in parts if len(p))


def test_a_process_that_forbids_models_cannot_build_or_load_one(tmp_path, topics):
    from sae_ray.lm.models import save_classifier

    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, 0, 32)
    save_classifier(clf, tmp_path / "m")
    with forbidden("a trial's driver"):
        with pytest.raises(RuntimeError, match="a trial's driver must not build or load a model"):
            build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, 0, 32)
        with pytest.raises(RuntimeError, match="must not build or load"):
            load_classifier(tmp_path / "m")
    load_classifier(tmp_path / "m")  # allowed again after the block


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.layer=5", "ValueError: model.layer: 5 is out of range for a 2-block model"),
        ("sae.k=300", "ValueError: k: 300 is larger than the 256 latents"),
    ],
)
def test_settings_the_models_config_rules_out_fail_before_a_worker_group(override, message):
    """The trial's driver reads the model's config (no weights, no Ray): a sampled layer the
    model lacks or a k above the dictionary fails the trial with the worker's message,
    without starting a worker group (Ray is not even initialised here)."""
    from sae_ray import config as C
    from sae_ray.trial.driver import TrialFailed, run_trial
    from tests.conftest import QUICKSTART

    cfg = C.load(QUICKSTART, [override])
    with pytest.raises(TrialFailed) as failed:
        run_trial(cfg, lambda metrics: None, "t")
    assert str(failed.value) == message
