"""End-to-end SAE losses (`--loss_fn ce|kl`): the SAE's reconstruction is spliced into the
model's forward pass and trained on what the model then predicts.

The model is frozen; gradient flows through the layers above the hookpoint into the SAE.
"What the model predicts" is its own head: the next token for a causal LM, the label for a
sequence classifier (an SAE-ception cycle's model). `ce` is cross-entropy against the data;
`kl` is KL(clean ‖ spliced), which asks the SAE to change nothing the model does downstream.
Only real (non-pad) tokens are encoded; pads pass through untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from sae_ray.distributed.ranks import all_reduce
from sae_ray.lm.extraction import token_rows
from sae_ray.lm.models import block_output, blocks, hooked_many
from sae_ray.lm.text_data import Split
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SparseAutoencoder, auxk_loss
from sae_ray.sae.training import DeadTracker, global_total_variance

Kind = Literal["lm", "classifier"]


def head_kind(name_or_path: str) -> Kind:
    """Which head the end-to-end loss reads, from the model's declared architecture."""
    archs = AutoConfig.from_pretrained(name_or_path).architectures or []
    if any("CausalLM" in a or "LMHead" in a for a in archs):
        return "lm"
    if any("SequenceClassification" in a for a in archs):
        return "classifier"
    raise ValueError(
        f"--loss_fn: {name_or_path} has neither a causal LM head nor a classification head "
        f"({', '.join(archs) or 'no architecture'}); use fvu or mse"
    )


def load_model(name_or_path: str, kind: Kind) -> torch.nn.Module:
    cls = AutoModelForCausalLM if kind == "lm" else AutoModelForSequenceClassification
    model = cls.from_pretrained(name_or_path)
    model.eval().requires_grad_(False)
    return model


def token_table(tokenizer, split: Split, ctx_len: int) -> tuple[pa.Table, int]:
    """Fixed-length token rows (+ label) for Ray Data, and the number of real tokens."""
    enc = tokenizer(
        split.texts, padding="max_length", truncation=True, max_length=ctx_len, return_tensors="np"
    )
    ids = enc["input_ids"].astype(np.int64)
    mask = enc["attention_mask"].astype(np.int64)

    def column(a: np.ndarray) -> pa.FixedSizeListArray:
        return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), ctx_len)

    table = pa.table(
        {"input_ids": column(ids), "attention_mask": column(mask), "label": split.labels}
    )
    return table, int(mask.sum())


class ModelFeed:
    """Token batches -> one forward with every hookpoint's SAE spliced in -> CE or KL."""

    def __init__(self, cfg: SaeTrainConfig, spec: dict[str, Any], world: int, device):
        self.cfg, self.world, self.device = cfg, world, device
        self.kind: Kind = spec["kind"]
        self.layers: dict[str, int] = spec["layers"]
        self.ctx_len: int = spec["ctx_len"]
        self.model = load_model(spec["model"], self.kind).to(device)
        self.blocks = blocks(self.model)

    def batches(self, shard, epoch: int):
        cfg = self.cfg
        per_worker = max(1, cfg.batch_size // self.ctx_len // self.world)
        return shard.iter_torch_batches(
            batch_size=per_worker,
            dtypes=torch.long,
            device=self.device,
            local_shuffle_buffer_size=per_worker * 8 if cfg.shuffle_buffer_tokens else None,
            local_shuffle_seed=cfg.shuffle_seed + epoch if cfg.shuffle_buffer_tokens else None,
        )

    def init_b_dec(self, saes: dict[str, SparseAutoencoder], batch) -> None:
        """b_dec from the clean activations (real tokens) of the first batch."""
        keep = token_rows(batch, self.cfg.exclude_tokens)
        with torch.no_grad(), hooked_many(self.model, list(self.layers.values())) as found:
            self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        for hp, layer in self.layers.items():
            saes[hp].init_b_dec(found[layer][keep].float())

    def _task_loss(self, logits, clean, batch) -> torch.Tensor:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if self.kind == "lm":  # next token, at real positions that have a real next token
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            logits, target = logits[:, :-1][valid], ids[:, 1:][valid]
            clean = None if clean is None else clean[:, :-1][valid]
        else:
            target = batch["label"]
        if clean is None:
            return F.cross_entropy(logits.float(), target)
        return F.kl_div(
            F.log_softmax(logits.float(), -1),
            F.log_softmax(clean.float(), -1),
            log_target=True,
            reduction="batchmean",
        )

    def losses(self, models, saes, batch, trackers: dict[str, DeadTracker]):
        # excluded tokens keep their clean activations: never spliced, never counted
        keep = token_rows(batch, self.cfg.exclude_tokens)
        aux_total: torch.Tensor | float = 0.0
        stats: dict[str, dict[str, float]] = {}
        pieces: dict[str, tuple] = {}

        def splice(_module, _inputs, out, hp):
            h = block_output(out)
            x = h[keep].float()
            dead = trackers[hp].dead()
            x_hat, codes = models[hp](x, dead)
            pieces[hp] = (x, x_hat, codes, int(dead.sum()))
            spliced = h.clone()
            spliced[keep] = x_hat.to(h.dtype)
            return (spliced, *out[1:]) if isinstance(out, tuple) else spliced

        clean = None
        if self.cfg.loss_fn == "kl":  # CE needs only the data; KL needs the clean model too
            with torch.no_grad():
                clean = self.model(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                ).logits
        handles = [
            self.blocks[layer].register_forward_hook(lambda m, i, o, hp=hp: splice(m, i, o, hp))
            for hp, layer in self.layers.items()
        ]
        try:
            logits = self.model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
        finally:
            for h in handles:
                h.remove()
        task = self._task_loss(logits, clean, batch)
        task_value = all_reduce(task.detach().clone()).item() / self.world

        for hp, (x, x_hat, codes, num_dead) in pieces.items():
            total_var, n_global = global_total_variance(x)
            aux = auxk_loss(saes[hp], x, x_hat.detach(), codes, num_dead, total_var)
            aux_total = aux_total + aux
            with torch.no_grad():
                trackers[hp].update(codes.indices, codes.values, n_global)
                fvu = all_reduce(((x - x_hat).pow(2).sum() / total_var).detach()).item()
            stats[hp] = {
                "loss": task_value,
                "fvu": fvu,
                "auxk": aux.item(),
                "l0": (codes.values > 0).sum().item() / len(x),
                "dead_pct": 100.0 * num_dead / saes[hp].cfg.num_latents,
                "tokens": n_global,
            }
        # DDP averages the per-worker mean task loss; AuxK is a share of a global sum.
        return task + self.world * self.cfg.auxk_alpha * aux_total, stats


def save_for_workers(model: torch.nn.Module, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
