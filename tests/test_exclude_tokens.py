"""Excluded tokens (`sae.exclude_tokens`, `sae.exclude_special_tokens`): never stored as
token rows and never spliced end to end, counted."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import torch

from sae_ray.config import Sae
from sae_ray.lm.extraction import extract, read_manifest
from sae_ray.lm.models import build_classifier
from tests.test_e2e import _feed


def _ids(clf, texts) -> list[list[int]]:
    return [clf.tokenizer(t, truncation=True, max_length=32)["input_ids"] for t in texts]


def test_excluded_ids_include_the_special_ones_when_asked(topics):
    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, seed=0, max_length=32)
    special = clf.tokenizer.all_special_ids
    assert special  # the tiny GPT-2's end-of-text, at least
    assert Sae(exclude_tokens=[5, 3]).excluded_ids(clf.tokenizer) == [3, 5]
    both = Sae(exclude_tokens=[5], exclude_special_tokens=True).excluded_ids(clf.tokenizer)
    assert both == sorted({5, *special})


def test_extraction_leaves_excluded_tokens_out_of_the_token_rows(tmp_path, topics):
    clf = build_classifier("tiny-gpt2", 4, topics.splits["train"].texts, seed=0, max_length=32)
    split = topics.splits["validation"]
    ids = _ids(clf, split.texts)
    counts = np.bincount(np.concatenate(ids))
    common = [int(i) for i in np.argsort(-counts)[:2]]  # the two most frequent tokens
    full = extract(clf, split, -1, tmp_path / "all", max_length=32)
    kept = extract(clf, split, -1, tmp_path / "some", max_length=32, exclude=common)
    assert full["tokens"].rows - kept["tokens"].rows == int(counts[common].sum()) > 0
    root = tmp_path / "some" / "tokens"
    stored = pq.read_table(read_manifest(root).paths(root), columns=["token_id"])
    assert not set(stored["token_id"].to_pylist()) & set(common)
    assert full["sequences"].rows == kept["sequences"].rows == len(split)  # pooled: untouched


def test_end_to_end_never_splices_an_excluded_token(tmp_path, topics):
    """The SAE sees exactly the real tokens less the excluded ones (counted)."""
    feed, cfg, hp, batches = _feed(tmp_path, topics, "ce")
    batch = batches[0]
    common = int(torch.mode(batch["input_ids"][batch["attention_mask"].bool()]).values)
    feed.cfg = cfg.model_copy(update={"exclude_tokens": [common]})
    from sae_ray.sae.model import SaeConfig, SparseAutoencoder
    from sae_ray.sae.training import DeadTracker

    sae = SparseAutoencoder(SaeConfig(64, 128, 4))
    seen = []
    sae.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    tracker = DeadTracker(torch.zeros(128, dtype=torch.long), window=10**9)
    feed.losses({hp: sae}, {hp: sae}, batch, {hp: tracker})
    real = batch["attention_mask"].bool()
    expected = int((real & (batch["input_ids"] != common)).sum())
    assert seen == [expected] and expected < int(real.sum())
