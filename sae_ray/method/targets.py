"""Sharpened targets: SAE codes of the training examples -> one dense target per example
id, kept in a `TargetTable` that the fine-tune looks rows up in by id.

The SAE-based strategies keep some of the latents active in each example's code and
decode them: `per_class` those among its class's top latents (by mean code), its
complement the others (the original paper's variant), `per_example` the example's own
strongest. How many is `sharpening.keep_frac` of k (or the seed's `top_k_pct` of the
dictionary); k is the example's own active count for the architectures whose L0 varies by
example. The controls separate the causes of a gain: `centroid` is each example's class
mean of the model's own activations (label supervision, no SAE), `shuffled` the sharpened
targets permuted across examples (their distribution without their pairing), `random` a
seeded unit vector that never looks at the SAE (any target at all), `none` λ = 0.

Codes stay (n, k) (the widest row's count for those): nothing here is O(n x latents).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from safetensors.torch import save_file

from sae_ray import storage
from sae_ray.config import CONTROL, Sharpening
from sae_ray.lm.extraction import load_sequences
from sae_ray.method.evaluate import active_codes
from sae_ray.method.seeds import stream
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.storage.artifacts import Artifact

log = logging.getLogger(__name__)
TARGETS, TARGET_STATS = "targets.safetensors", "stats.json"  # a targets artifact's files


@dataclass
class TargetTable:
    """Sharpened targets keyed by example id (sorted ids + one row each), and the centre
    the aux cosine is taken about (`cycles.aux_center`; None: the uncentred cosine)."""

    ids: np.ndarray
    vectors: torch.Tensor
    center: torch.Tensor | None = None

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
        tensors = {"ids": torch.from_numpy(self.ids), "vectors": self.vectors.contiguous()}
        if self.center is not None:
            tensors["center"] = self.center.contiguous()
        save_file(tensors, path)

    @classmethod
    def load(cls, location: str | Path) -> TargetTable:
        """From a local path or a bucket URI (one small file: read, never cached)."""
        tensors = safetensors.torch.load(storage.read_bytes(str(location)))
        return cls(tensors["ids"].numpy(), tensors["vectors"], tensors.get("center"))


def class_masks(
    values: np.ndarray, indices: np.ndarray, labels: np.ndarray, num_classes: int, m: int, keep: int
) -> np.ndarray:
    """(C, m) boolean: the `keep` latents with the largest mean code within each class."""
    sums = np.zeros((num_classes, m))
    np.add.at(sums, (np.repeat(labels, values.shape[1]), indices.ravel()), values.ravel())
    masks = np.zeros((num_classes, m), dtype=bool)
    for c in range(num_classes):
        if (labels == c).any():
            masks[c, np.argsort(-sums[c], kind="stable")[:keep]] = True
    return masks


def example_masks(values: np.ndarray, keep: int | np.ndarray) -> np.ndarray:
    """(n, w) boolean: each code's `keep` largest active entries (`keep` one count, or
    one per row)."""
    order = np.argsort(-values, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(values.shape[1])[None, :], axis=1)
    return (rank < np.reshape(keep, (-1, 1))) & (values > 0)


def keep_counts(rule: Sharpening, sae: SparseAutoencoder, values: np.ndarray) -> np.ndarray:
    """How many latents each example keeps: `rule.kept` of its k. A TopK code has k active
    latents; the other architectures' rows vary (BatchTopK's threshold, JumpReLU's), so
    there each row's own active count stands for k: keep_frac is always a fraction of what
    is active in that example."""
    m = sae.cfg.num_latents
    if sae.arch.fixed_l0:
        return np.full(len(values), rule.kept(sae.cfg.k, m))
    active = (values > 0).sum(1)
    counts = {a: rule.kept(max(int(a), 1), m) for a in np.unique(active)}
    return np.array([counts[a] for a in active], dtype=np.int64)


def random_targets(ids: np.ndarray, d: int, seed: int) -> np.ndarray:
    """A unit vector per example, a function of (seed, example id) alone."""
    out = np.empty((len(ids), d), dtype=np.float32)
    for row, example_id in enumerate(ids):
        v = np.random.default_rng([seed, int(example_id)]).standard_normal(d)
        out[row] = v / np.linalg.norm(v)
    return out


def centroid_targets(labels: np.ndarray, x: np.ndarray, num_classes: int) -> np.ndarray:
    """Each example's class mean of `x` (the model's own activations)."""
    means = np.zeros((num_classes, x.shape[1]), dtype=np.float64)
    np.add.at(means, labels, x.astype(np.float64))
    means /= np.maximum(np.bincount(labels, minlength=num_classes), 1)[:, None]
    return means[labels].astype(np.float32)


@dataclass
class Sharpened:
    """A strategy's targets and how many latents each kept (None: not from SAE codes)."""

    table: TargetTable | None
    kept_latents: float | None = None


@torch.no_grad()
def sharpen_codes(
    strategy: str,
    sae: SparseAutoencoder,
    labels: np.ndarray,
    x: np.ndarray,
    num_classes: int,
    rule: Sharpening,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, float]:
    """The SAE-based targets (n, d) of `x` under `strategy`, and the mean kept count.
    `per_class` keeps, per class, as many latents as an example keeps on average."""
    values, indices = active_codes(sae, x, device)
    keep = keep_counts(rule, sae, values)
    if strategy == "per_example":
        mask = example_masks(values, keep)
    elif strategy in ("per_class", "per_class_complement"):
        per_class = max(1, round(float(keep.mean()))) if len(keep) else 1
        m = sae.cfg.num_latents
        masks = class_masks(values, indices, labels, num_classes, m, per_class)
        mask = masks[labels[:, None], indices]
        mask = (~mask if strategy == "per_class_complement" else mask) & (values > 0)
    else:
        raise ValueError(f"sharpening.strategy: {strategy!r} does not sharpen SAE codes")
    kept = torch.from_numpy(values * mask).to(device)
    decoded = sae.decode_sparse(kept, torch.from_numpy(indices).to(device)) + sae.b_dec
    return decoded.float().cpu().numpy(), float(mask.sum(1).mean())


def sharpen(
    strategy: str,
    sae: SparseAutoencoder | None,
    ids: np.ndarray,
    labels: np.ndarray,
    x: np.ndarray,
    num_classes: int,
    rule: Sharpening,
    seed: int,
    cycle: int,
    device: torch.device | str = "cpu",
    shuffle_of: str = "per_class",
    centered: bool = False,
) -> Sharpened:
    """Targets in the model's activation space for each training example (none for
    'none'); `seed` and `cycle` pick the random and shuffling streams, `shuffle_of` whose
    targets `shuffled` permutes. `centered`: the table carries the centre of the aux
    cosine, the mean of `x`, and a random target is a random direction about it."""
    if strategy == CONTROL:
        return Sharpened(None)
    center = torch.from_numpy(x.astype(np.float64).mean(0).astype(np.float32))
    kept = None
    if strategy == "random":
        vectors = random_targets(ids, x.shape[1], stream(seed, cycle, "random_targets"))
        if centered:
            vectors = vectors + center.numpy()
    elif strategy == "centroid":
        vectors = centroid_targets(labels, x, num_classes)
    else:
        assert sae is not None
        base = shuffle_of if strategy == "shuffled" else strategy
        vectors, kept = sharpen_codes(base, sae, labels, x, num_classes, rule, device)
        if strategy == "shuffled":
            order = np.random.default_rng(stream(seed, cycle, "shuffle")).permutation(len(ids))
            vectors = vectors[order]
    table = TargetTable(ids.copy(), torch.from_numpy(vectors), center if centered else None)
    return Sharpened(table, kept)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(norms, 1e-12)


@torch.no_grad()
def target_metrics(
    table: TargetTable,
    sae: SparseAutoencoder,
    ids: np.ndarray,
    x: np.ndarray,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Whether the targets ask for anything: their mean cosine to the SAE's own
    reconstruction of each example (1: sharpening changed nothing), both taken about
    `b_dec` (each contains it, and an activation mean shared by two vectors makes any two
    look alike), and the cosine aux 1 − cos(h, t) at the start of retraining (h: the
    model's activation now; about the table's centre when it has one)."""
    t = table.lookup(ids).float().numpy()
    values, indices = active_codes(sae, x, device)
    recon = sae.decode_sparse(
        torch.from_numpy(values).to(device), torch.from_numpy(indices).to(device)
    )
    b_dec = sae.b_dec.detach().float().cpu().numpy()
    center = 0.0 if table.center is None else table.center.float().numpy()
    return {
        "targets/recon_cos": float(_cosine(t - b_dec, recon.float().cpu().numpy()).mean()),
        "targets/initial_aux": float((1 - _cosine(x - center, t - center)).mean()),
    }


def target_report(
    targets: Artifact, sae: Artifact, acts: Artifact, hp: str, device: torch.device | str
) -> dict[str, float]:
    """`targets/...` metrics of a cycle's targets artifact (rank 0): what retraining will
    ask of the next model."""
    ids, _, x = load_sequences(acts.local("train", "sequences"), hp)
    table = TargetTable.load(targets.uri(TARGETS))
    out = target_metrics(table, SparseAutoencoder.load(sae.local()), ids, x, device)
    kept = json.loads(storage.read_bytes(targets.uri(TARGET_STATS)))["kept_latents"]
    if kept is not None:
        out["targets/kept_latents"] = kept
    return out
