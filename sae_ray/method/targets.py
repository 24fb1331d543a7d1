"""Sharpened targets: SAE codes of the training examples -> one dense target per example
id, kept in a `TargetTable` that the fine-tune looks rows up in by id.

per_class keeps, in each example's code, only the top p% latents of its class's mean code
(per_class_complement drops exactly those and keeps the rest, the variant the original
paper tried);
per_example keeps the example's own top p%; random is a seeded unit vector that never looks
at the SAE (the control for "any target at all"); none means λ = 0 (equal-compute control).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import save_file

from sae_ray import storage
from sae_ray.config import CONTROL
from sae_ray.sae.model import SparseAutoencoder

log = logging.getLogger(__name__)


@dataclass
class TargetTable:
    """Sharpened targets keyed by example id (sorted ids + one row each)."""

    ids: np.ndarray
    vectors: torch.Tensor

    def __post_init__(self) -> None:
        order = np.argsort(self.ids)
        self.ids = self.ids[order]
        self.vectors = self.vectors[torch.as_tensor(order)]

    def lookup(self, ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        ids = np.asarray(ids)
        rows = np.searchsorted(self.ids, ids)
        rows = np.minimum(rows, len(self.ids) - 1)
        if not np.array_equal(self.ids[rows], ids):
            missing = ids[self.ids[rows] != ids][0]
            raise KeyError(f"no sharpened target for example id {missing}")
        return self.vectors[torch.as_tensor(rows)]

    def save(self, path: Path) -> None:
        save_file({"ids": torch.from_numpy(self.ids), "vectors": self.vectors.contiguous()}, path)

    @classmethod
    def load(cls, location: str | Path) -> TargetTable:
        """From a local path or a bucket URI (one small file: read, never cached)."""
        tensors = safetensors.torch.load(storage.read_bytes(str(location)))
        return cls(tensors["ids"].numpy(), tensors["vectors"])


def num_kept(num_latents: int, top_k_pct: float) -> int:
    return max(1, math.ceil(num_latents * top_k_pct / 100))


def class_masks(codes: np.ndarray, labels: np.ndarray, num_classes: int, keep: int) -> np.ndarray:
    """(C, m) boolean: the `keep` latents with the largest mean code within each class."""
    masks = np.zeros((num_classes, codes.shape[1]), dtype=bool)
    for c in range(num_classes):
        members = codes[labels == c]
        if len(members):
            masks[c, np.argsort(-members.mean(0), kind="stable")[:keep]] = True
    return masks


def example_masks(codes: np.ndarray, keep: int) -> np.ndarray:
    top = np.argsort(-codes, axis=1, kind="stable")[:, :keep]
    masks = np.zeros_like(codes, dtype=bool)
    np.put_along_axis(masks, top, True, axis=1)
    return masks


def random_targets(ids: np.ndarray, d: int, seed: int) -> np.ndarray:
    """A unit vector per example, a function of (seed, example id) alone."""
    out = np.empty((len(ids), d), dtype=np.float32)
    for row, example_id in enumerate(ids):
        v = np.random.default_rng([seed, int(example_id)]).standard_normal(d)
        out[row] = v / np.linalg.norm(v)
    return out


@torch.no_grad()
def sharpen(
    strategy: str,
    sae: SparseAutoencoder | None,
    ids: np.ndarray,
    labels: np.ndarray,
    x: np.ndarray,
    num_classes: int,
    top_k_pct: float,
    seed: int,
) -> TargetTable | None:
    """Targets in the model's activation space for each training example, or None for 'none'."""
    if strategy == CONTROL:
        return None
    if strategy == "random":
        return TargetTable(ids.copy(), torch.from_numpy(random_targets(ids, x.shape[1], seed)))
    assert sae is not None
    codes = sae.dense_codes(torch.from_numpy(x)).numpy()
    keep = num_kept(sae.cfg.num_latents, top_k_pct)
    if strategy == "per_class":
        mask = class_masks(codes, labels, num_classes, keep)[labels]
    elif strategy == "per_class_complement":  # the paper's variant: drop the class's top
        mask = ~class_masks(codes, labels, num_classes, keep)[labels]
    elif strategy == "per_example":
        if keep >= sae.cfg.k:
            log.warning(
                "per_example keeps %d latents >= k=%d: the targets equal the SAE's own "
                "reconstruction, so sharpening changes nothing",
                keep,
                sae.cfg.k,
            )
        mask = example_masks(codes, keep)
    else:
        raise ValueError(f"sharpening.strategy: unknown strategy {strategy!r}")
    kept = torch.from_numpy(codes * mask)
    return TargetTable(ids.copy(), sae.decode_dense(kept).float())
