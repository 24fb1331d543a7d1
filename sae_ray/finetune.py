"""Fine-tune the classifier: cross-entropy, plus λ·(1 − cos(h, t)) from cycle 1 on.

h is the hooked block's output at the pooled position, with gradient; t is the example's
sharpened target, looked up by example id so any batch order pairs correctly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from sae_ray.config import Cycles
from sae_ray.data import Split
from sae_ray.models import Classifier, hooked, pooled


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


def batches(
    clf: Classifier, split: Split, batch_size: int, max_length: int, order: np.ndarray | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Tokenised batches, padded per batch, carrying each row's example id."""
    order = np.arange(len(split)) if order is None else order
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = clf.tokenizer(
            [split.texts[i] for i in idx],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": torch.as_tensor(split.labels[idx]),
            "ids": torch.as_tensor(split.ids[idx]),
        }


def aux_loss(h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(h, targets.to(h.dtype), dim=-1)).mean()


def loss_on_batch(
    clf: Classifier,
    batch: dict[str, torch.Tensor],
    layer: int,
    aux_weight: float,
    targets: TargetTable | None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + λ·aux for one batch; the aux term is skipped (not zeroed) when λ = 0."""
    use_aux = aux_weight > 0 and targets is not None
    with hooked(clf.model, layer) as store:
        out = clf.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    ce = F.cross_entropy(out.logits, batch["labels"])
    parts = {"ce": ce.item()}
    if not use_aux:
        return ce, parts
    h = pooled(store["h"], batch["attention_mask"], clf.pooling)
    aux = aux_loss(h, targets.lookup(batch["ids"].numpy()))
    parts["aux"] = aux.item()
    return ce + aux_weight * aux, parts


def finetune(
    clf: Classifier,
    train: Split,
    cfg: Cycles,
    layer: int,
    max_length: int,
    seed: int,
    targets: TargetTable | None = None,
    aux_weight: float = 0.0,
    warmup_steps: int = 100,
    val: Split | None = None,
) -> list[dict[str, float]]:
    """AdamW with linear warm-up and decay, gradient clip 1.0; returns per-epoch mean losses.

    With `val`, the model ends as its best epoch on validation accuracy (ties: the later
    epoch), never chosen on the held-out test split."""
    model = clf.model
    model.train()
    rng = np.random.default_rng(seed)
    steps = cfg.epochs * -(-len(train) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, min(warmup_steps, steps // 10), steps)
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    for _ in range(cfg.epochs):
        sums: dict[str, float] = {}
        n = 0
        for batch in batches(clf, train, cfg.batch_size, max_length, rng.permutation(len(train))):
            loss, parts = loss_on_batch(clf, batch, layer, aux_weight, targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            n += 1
        history.append({key: value / n for key, value in sums.items()})
        if val is not None:
            acc = float((predict(clf, val, max_length) == val.labels).mean())
            history[-1]["val_accuracy"] = acc
            if best is None or acc >= best[0]:
                best = (acc, {k: v.detach().clone() for k, v in model.state_dict().items()})
            model.train()
    if best is not None:
        model.load_state_dict(best[1])
    model.eval()
    return history


@torch.no_grad()
def predict(clf: Classifier, split: Split, max_length: int, batch_size: int = 128) -> np.ndarray:
    clf.model.eval()
    preds = [
        clf.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        .logits.argmax(-1)
        .numpy()
        for b in batches(clf, split, batch_size, max_length)
    ]
    return np.concatenate(preds)
