"""Fine-tune the classifier: cross-entropy, plus λ·aux(h, t) from cycle 1 on (1 − cos,
about the activations' mean with `cycles.aux_center`, or the MSE).

h is the hooked block's output at the pooled position, with gradient; t is the example's
sharpened target, looked up by example id so any batch order pairs correctly.

`finetune` is one training loop that runs alone (tests, one process) or as one DDP rank of
a trial's Train run (`stages.py`), ending at the best epoch on validation.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_linear_schedule_with_warmup

from sae_ray import storage
from sae_ray.config import Cycles
from sae_ray.distributed import sharding
from sae_ray.distributed.ranks import all_reduce, rank_world
from sae_ray.lm.batching import batches, encode, lm_batch_rows
from sae_ray.lm.models import (
    Classifier,
    block_output,
    blocks,
    build_classifier,
    hooked,
    load_classifier,
    pooled,
    resolve_layer,
)
from sae_ray.lm.text_data import Split, TextData
from sae_ray.method.cpt import LmAux, next_token_ce, perplexity
from sae_ray.method.targets import TargetTable

log = logging.getLogger(__name__)
HISTORY = "history.json"


def aux_loss(
    h: torch.Tensor,
    targets: torch.Tensor,
    form: str = "cosine",
    center: torch.Tensor | None = None,
) -> torch.Tensor:
    """aux(h, t) over a batch: 1 − cos(h − c, t − c) (c: `center`, else 0), or the MSE
    (mean over examples and dimensions)."""
    h, t = h.float(), targets.to(h.device, torch.float32)
    if form == "mse":
        return F.mse_loss(h, t)
    if center is not None:
        c = center.to(h.device, torch.float32)
        h, t = h - c, t - c
    return (1 - F.cosine_similarity(h, t, dim=-1)).mean()


def loss_on_batch(
    clf: Classifier,
    batch: dict[str, torch.Tensor],
    layer: int,
    aux_weight: float,
    targets: TargetTable | LmAux | None,
    forward: torch.nn.Module | None = None,
    aux_form: str = "cosine",
) -> tuple[torch.Tensor, dict[str, float]]:
    """CE + λ·aux for one batch; the aux term is skipped (not zeroed) when λ = 0.
    `aux_form`: a classifier's aux (`aux_loss`), about the target table's centre if any.

    `forward` is what runs the batch (a DDP wrapper of `clf.model` on a worker); the hook
    sits on the wrapped model's block either way. A causal LM's CE is next-token CE over
    its real tokens and its aux term (`LmAux`) covers every real token."""
    use_aux = aux_weight > 0 and targets is not None
    device = next(clf.model.parameters()).device
    mask = batch["attention_mask"].to(device)
    input_ids = batch["input_ids"].to(device)
    with hooked(clf.model, layer) as store:
        out = (forward or clf.model)(input_ids=input_ids, attention_mask=mask)
    if isinstance(targets, LmAux) or clf.is_lm:
        ce_sum, count = next_token_ce(out.logits, input_ids, mask)
        ce = ce_sum / count.clamp_min(1)
        if not use_aux or not targets.active:
            return ce, {"ce": ce.item()}
        aux = targets.term(store["h"], mask.bool())
        return ce + aux_weight * aux, {"ce": ce.item(), "aux": aux.item()}
    ce = F.cross_entropy(out.logits.float(), batch["labels"].to(device))
    parts = {"ce": ce.item()}
    if not use_aux:
        return ce, parts
    h = pooled(store["h"], mask, clf.pooling)
    aux = aux_loss(h, targets.lookup(batch["ids"].numpy()), aux_form, targets.center)
    parts["aux"] = aux.item()
    return ce + aux_weight * aux, parts


def select_trainable(model: torch.nn.Module, layer: int, train_layers: str) -> list:
    """The parameters retraining updates; the rest are frozen (requires_grad False).

    'from_hooked' trains the hooked block, every block above it and everything registered
    after the blocks (final norm, pooler, head): HF models register embeddings, then blocks,
    then the head, so "above" is "at or after the hooked block's first parameter"."""
    params = list(model.named_parameters())
    if train_layers == "all":
        for _, p in params:
            p.requires_grad_(True)
        return [p for _, p in params]
    first = next(iter(blocks(model)[resolve_layer(model, layer)].parameters()))
    start = next(i for i, (_, p) in enumerate(params) if p is first)
    for i, (_, p) in enumerate(params):
        p.requires_grad_(i >= start)
    return [p for _, p in params[start:]]


def best_epoch(history: list[dict[str, float]]) -> dict[str, float]:
    """The epoch record `finetune` ends at: best validation accuracy (a causal LM: lowest
    validation perplexity), ties to the later."""
    return max(history, key=lambda r: (_val_score(r), r["epoch"]))


def _validation(clf: Classifier, val: Split, max_length: int) -> dict[str, float]:
    if clf.is_lm:
        return {"val_perplexity": perplexity_on(clf, val, max_length)}
    return {"val_accuracy": accuracy_on(clf, val, max_length)}


def _val_score(record: dict[str, float]) -> float:
    if "val_perplexity" in record:
        return -record["val_perplexity"]
    return record["val_accuracy"]


def epoch_rows(n: int, batch_size: int, seed: int, epoch: int, rank: int, world: int):
    """This rank's rows of each global batch of one epoch, with the global batch's size.

    The shuffle is a function of (seed, epoch) alone and every global batch is split across
    the ranks, so the examples seen per step do not depend on the worker count. A last batch
    smaller than the worker count is dropped (at most world − 1 examples per epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        if len(idx) < world:
            return
        yield np.array_split(idx, world)[rank], len(idx)


def steps_per_epoch(n: int, batch_size: int, world: int) -> int:
    full, rest = divmod(n, batch_size)
    return full + (rest >= world and rest > 0)


def _sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=device)).tolist()


def finetune(
    clf: Classifier,
    train: Split,
    cfg: Cycles,
    layer: int,
    max_length: int,
    seed: int,
    targets: TargetTable | LmAux | None = None,
    aux_weight: float = 0.0,
    val: Split | None = None,
    train_layers: str = "all",
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    strategy: sharding.Strategy = "ddp",
    activation_checkpointing: bool = False,
    device: torch.device | None = None,
) -> list[dict[str, float]]:
    """AdamW with linear warm-up and decay, gradient clip; returns per-epoch records.

    Runs as one rank when torch.distributed is initialised (each rank its share of every
    global batch), the model replicated (`ddp`) or sharded (`fsdp`) over the ranks. With
    `val`, the model ends as its best epoch on validation accuracy (ties: the later epoch),
    never chosen on the held-out test split. `device` is where the model trains (default:
    where it is; a model to shard may still be on the CPU: each block moves as a shard)."""
    rank, world = rank_world()
    model = clf.model
    device = device or next(model.parameters()).device
    select_trainable(model, layer, train_layers)
    if activation_checkpointing:  # recompute each block's activations in backward
        model.activation_checkpointing_enable({"use_reentrant": False})
    bf16 = cfg.autocast and device.type == "cuda"
    forward = sharding.wrap(model, strategy, device, bf16, blocks(model))
    params = [p for p in model.parameters() if p.requires_grad]  # sharded ones under fsdp
    total = cfg.epochs * steps_per_epoch(len(train), cfg.batch_size, world)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, min(cfg.warmup_steps, total), total)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    history: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    keeps_copy = rank == 0 or sharding.is_sharded(model)  # shards: every rank its own
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        sums = {"ce": 0.0, "aux": 0.0}
        n = 0
        for rows, global_n in epoch_rows(len(train), cfg.batch_size, seed, epoch, rank, world):
            batch = encode(clf, train, rows, max_length)
            with autocast:
                loss, parts = loss_on_batch(
                    clf, batch, layer, aux_weight, targets, forward, cfg.aux_loss or "cosine"
                )
            # DDP averages gradients over ranks: weight each rank's mean by its share so the
            # step is the global batch's mean even when the split is uneven.
            (loss * (len(rows) * world / global_n)).backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            for key, value in parts.items():
                sums[key] += value
            n += 1
            step += 1
        ce, aux, count = _sum_over_ranks([sums["ce"], sums["aux"], n], device)
        record = {"epoch": epoch, "steps": step, "ce": ce / max(count, 1)}
        if aux_weight > 0 and targets is not None:
            record["aux"] = aux / max(count, 1)
        if val is not None:
            record.update(_validation(clf, val, max_length))
            if keeps_copy and (best is None or _val_score(record) >= best[0]):
                best = (_val_score(record), sharding.snapshot(model))
        history.append(record)
        if on_epoch is not None:
            on_epoch(record)
    if best is not None:
        sharding.restore(model, best[1])
    if activation_checkpointing:
        model.activation_checkpointing_disable()
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history


@torch.no_grad()
def accuracy_on(clf: Classifier, split: Split, max_length: int, batch_size: int = 128) -> float:
    """Accuracy over the whole split; each rank scores its slice and counts add up. Every
    rank runs the same number of forward passes (a sharded model's are collective): one
    whose slice is used up scores a row it does not count."""
    rank, world = rank_world()
    device = next(clf.model.parameters()).device
    idx = np.array_split(np.arange(len(split)), world)[rank]
    longest = -(-len(split) // world)
    clf.model.eval()
    correct = 0
    for start in range(0, longest, batch_size):
        rows = idx[start : start + batch_size]
        b = encode(clf, split, rows if len(rows) else np.arange(1), max_length)
        logits = clf.model(
            input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
        ).logits
        correct += int((logits.argmax(-1).cpu() == b["labels"]).sum()) if len(rows) else 0
    right, total = _sum_over_ranks([correct, len(idx)], device)
    return right / max(total, 1)


def perplexity_on(clf: Classifier, split: Split, max_length: int, **kwargs: Any) -> float:
    """exp(token-mean next-token CE) over the split's real tokens (`lm_ce_sums`' options:
    each rank its slice, or this process alone; the SAE's reconstruction spliced in)."""
    return perplexity(*lm_ce_sums(clf, split, max_length, **kwargs))


@torch.no_grad()
def lm_ce_sums(
    clf: Classifier,
    split: Split,
    max_length: int,
    batch_size: int | None = None,
    layer: int | None = None,
    splice=None,
    everyone: bool = True,
) -> tuple[float, float]:
    """(summed CE, tokens scored) over the split's real tokens. Each rank scores its slice
    (the same number of forward passes on every rank) and the sums add up, or this process
    scores it all (`everyone=False`: rank 0's evaluation). `splice` (h -> h', at block
    `layer`) replaces the block's output on real tokens: the model with an SAE's
    reconstruction in place of its own activations."""
    rank, world = rank_world() if everyone else (0, 1)
    batch_size = batch_size or lm_batch_rows(max_length)
    device = next(clf.model.parameters()).device
    idx = np.array_split(np.arange(len(split)), world)[rank]
    longest = -(-len(split) // world)
    clf.model.eval()
    total, count = 0.0, 0.0
    for start in range(0, longest, batch_size):
        rows = idx[start : start + batch_size]
        b = encode(clf, split, rows if len(rows) else np.arange(1), max_length)
        ids, mask = b["input_ids"].to(device), b["attention_mask"].to(device)
        with spliced_at(clf.model, layer, mask.bool(), splice):
            logits = clf.model(input_ids=ids, attention_mask=mask).logits
        ce, n = next_token_ce(logits, ids, mask)
        if len(rows):
            total, count = total + float(ce), count + float(n)
    if everyone:
        total, count = _sum_over_ranks([total, count], device)
    return total, count


@contextlib.contextmanager
def spliced_at(model: torch.nn.Module, layer: int | None, keep: torch.Tensor, splice):
    """Replace block `layer`'s output at the real tokens by `splice(h[keep])` while the
    block runs (nothing when `splice` is None)."""
    if splice is None:
        yield
        return

    def hook(_module, _inputs, out):
        h = block_output(out)
        new = h.clone()
        new[keep] = splice(h[keep].float()).to(h.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = blocks(model)[resolve_layer(model, layer)].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def predict(clf: Classifier, split: Split, max_length: int, batch_size: int = 128) -> np.ndarray:
    clf.model.eval()
    device = next(clf.model.parameters()).device
    preds = [
        clf.model(
            input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)
        )
        .logits.argmax(-1)
        .cpu()
        .numpy()
        for b in batches(clf, split, batch_size, max_length)
    ]
    return np.concatenate(preds)


def initial_classifier(init: dict[str, Any], data: TextData) -> Classifier:
    """{'load': dir} or {'build': {name, seed, max_length, dtype}} (a fresh head)."""
    if "load" in init:
        return load_classifier(storage.local_copy(init["load"]))
    spec = init["build"]
    return build_classifier(
        spec["name"],
        data.num_classes,
        data.splits["train"].texts,
        spec["seed"],
        spec["max_length"],
        spec.get("dtype", "float32"),
        lm=spec.get("lm", False),
    )
