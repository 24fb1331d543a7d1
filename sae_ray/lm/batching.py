"""Labelled text -> tokenised model batches that carry each row's example id (what pairs a
row with its sharpened target and its activations, whatever the batch order)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from sae_ray.lm.models import Classifier
from sae_ray.lm.text_data import Split, TextData


def batches(
    clf: Classifier, split: Split, batch_size: int, max_length: int, order: np.ndarray | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches, padded per batch, carrying each row's example id."""
    order = np.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        yield encode(clf, split, order[start : start + batch_size], max_length)


def encode(clf: Classifier, split: Split, idx: np.ndarray, max_length: int) -> dict:
    if split.tokens is not None:  # packed blocks: already the model's input
        return {
            "input_ids": torch.as_tensor(split.tokens[idx]),
            "attention_mask": torch.as_tensor(split.mask[idx]),
            "labels": torch.as_tensor(split.labels[idx]),
            "ids": torch.as_tensor(split.ids[idx]),
        }
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


LM_BATCH_TOKENS = 8192  # a causal LM's evaluation batch: its logits are tokens x vocabulary


def lm_batch_rows(block: int) -> int:
    """Blocks per evaluation batch of a causal LM (at least one)."""
    return max(1, LM_BATCH_TOKENS // block)


def pack_blocks(tokenizer, split: Split, block: int, first_id: int = 0) -> Split:
    """A causal LM's rows: the split's documents tokenised, joined (with the tokenizer's
    EOS between documents when it has one), cut into `block`-token rows with ids from
    `first_id`. The last row is padded (mask 0) rather than dropped, so every real token
    is scored exactly once."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(split.texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    rows = max(1, -(-len(stream) // block))
    tokens = np.full(rows * block, tokenizer.pad_token_id or 0, dtype=np.int64)
    mask = np.zeros(rows * block, dtype=np.int64)
    tokens[: len(stream)], mask[: len(stream)] = stream, 1
    return Split(
        ids=np.arange(first_id, first_id + rows, dtype=np.int64),
        texts=[],
        labels=np.zeros(rows, dtype=np.int64),
        tokens=tokens.reshape(rows, block),
        mask=mask.reshape(rows, block),
    )


def packed(tokenizer, data: TextData, block: int) -> TextData:
    """Every split as token blocks, ids unique across the splits (what extraction and the
    activation rows carry)."""
    splits, first = {}, 0
    for name, split in data.splits.items():
        splits[name] = pack_blocks(tokenizer, split, block, first)
        first += len(splits[name])
    return TextData(splits=splits, num_classes=1, label_names=["text"])
