"""Labelled text -> tokenised model batches that carry each row's example id (what pairs a
row with its sharpened target and its activations, whatever the batch order)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sae_ray.lm.models import Classifier
from sae_ray.lm.text_data import Split


def batches(
    clf: Classifier, split: Split, batch_size: int, max_length: int, order: np.ndarray | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches, padded per batch, carrying each row's example id."""
    order = np.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        yield encode(clf, split, order[start : start + batch_size], max_length)


def encode(clf: Classifier, split: Split, idx: np.ndarray, max_length: int) -> dict:
    enc = clf.tokenizer(
        [split.texts[i] for i in idx],
        padding=True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.as_tensor(split.labels[idx]),
        "ids": torch.as_tensor(split.ids[idx]),
    }
