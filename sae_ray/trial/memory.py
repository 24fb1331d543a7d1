"""The memory plan: what each stage of a trial holds per worker, estimated from the config
and the model's architecture alone (no weights, no cluster), so a sweep that cannot fit
is refused before Ray starts rather than failing trial after trial out of memory.

Per worker, for P parameters in w bytes each (the model's dtype), N workers:
- fine-tune: the weights, w·P, and for the T trained parameters (all in cycle 0's
  fine-tune; in retraining all, or the hooked block and those above it) gradients and
  AdamW's two moments, 3·w·T (DDP: all of it on every worker, plus its gradient buckets,
  w·T; FSDP: divided by N, plus two gathered blocks), and the activations kept for
  backward (Korthikanti et al. 2022: s·b·h·(34 + 5·a·s/h) bytes per block at 16 bits;
  with activation checkpointing, each block's input only);
- extraction: the model for inference (w·P) and one batch's hidden states;
- SAE fit: the SAE's weights, gradients and Adam moments (16 bytes a parameter) and a
  batch's pre-activations (batch x latents, float32);
- evaluation (rank 0): the model, the SAE, sparse codes (n x k) and pooled activations;
- a causal LM adds its logits (tokens x vocabulary, float32) to the fine-tune and the
  evaluation (extraction runs the model without its head).
Estimates, not measurements: the plan refuses only what is clearly over (more than
`USABLE` of the device), and prints every figure so the user can judge the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sae_ray.config import Config, ConfigError
from sae_ray.lm.batching import lm_batch_rows
from sae_ray.lm.models import blocks

GB = 1e9
USABLE = 0.9  # of a device's memory: the CUDA context, allocator fragmentation
ADAM_STATE = 4  # weights, gradients, two moments: in units of the weights' size
SAE_STATE = 16  # the SAE trains in float32: weights, gradients, two moments


def _size(n: float) -> str:
    return f"{n / GB:.1f} GB" if n >= GB else f"{n / 1e6:.1f} MB"


@dataclass
class Stage:
    name: str
    parts: dict[str, float]  # bytes
    field: str  # the setting to change when it does not fit
    advice: str

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Shape:
    """What the plan needs of the model: counted on the meta device (no memory)."""

    params: int
    block_params: int
    hidden: int
    layers: int
    heads: int
    vocab: int = 0  # a causal LM's logits per token (0: a classifier's are negligible)

    @classmethod
    def of(cls, config, lm: bool = False) -> Shape:
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        auto = AutoModelForCausalLM if lm else AutoModelForSequenceClassification
        with torch.device("meta"):
            model = auto.from_config(config)
        return cls(
            params=sum(p.numel() for p in model.parameters()),
            block_params=sum(p.numel() for p in blocks(model)[0].parameters()),
            hidden=config.hidden_size,
            layers=config.num_hidden_layers,
            heads=config.num_attention_heads,
            vocab=config.vocab_size if lm else 0,
        )


@dataclass
class Plan:
    stages: list[Stage]
    device_gb: float | None
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        where = f"of {self.device_gb:g} GB" if self.device_gb else "(no resources.gpu_memory_gb)"
        out = [f"memory per worker {where}:"]
        for stage in self.stages:
            parts = ", ".join(f"{k} {_size(v)}" for k, v in stage.parts.items() if v)
            out.append(f"  {stage.name:<11} {_size(stage.total):>9}  ({parts})")
        return out + [f"  note: {n}" for n in self.notes]

    def summary(self) -> str:
        parts = ", ".join(f"{s.name} {_size(s.total)}" for s in self.stages)
        return f"memory per worker: {parts}"

    def check(self) -> None:
        """ConfigError naming the field of the first stage over the device's usable memory."""
        if not self.device_gb:
            return
        for stage in self.stages:
            if stage.total > USABLE * self.device_gb * GB:
                raise ConfigError(
                    f"{stage.field}: the {stage.name} needs ~{_size(stage.total)} per "
                    f"worker, a worker has {self.device_gb:g} GB; {stage.advice}"
                )


def _weight_bytes(cfg: Config) -> int:
    return 2 if cfg.model.dtype == "bfloat16" else 4


def _activation_bytes(cfg: Config, shape: Shape, per_worker: int) -> float:
    s, b, h, a = cfg.model.max_length, per_worker, shape.hidden, shape.heads
    bits16 = cfg.resources.use_gpu and cfg.cycles.autocast
    scale = 1 if bits16 or cfg.model.dtype == "bfloat16" else 2  # the formula is at 16 bits
    per_block = s * b * h * (34 + 5 * a * s / h) * scale
    if cfg.resources.activation_checkpointing:
        return shape.layers * 2 * s * b * h * scale + per_block
    return shape.layers * per_block


def _trained(cfg: Config, shape: Shape) -> int:
    """The most parameters any fine-tune trains: all of them in cycle 0's (when it
    fine-tunes), or what `train_layers` leaves trainable in retraining."""
    if cfg.cycles.train_layers == "all" or cfg.cycles.start_from == "finetune":
        return shape.params
    layer = cfg.model.layer % shape.layers
    return (shape.layers - layer) * shape.block_params


def _finetune(cfg: Config, shape: Shape) -> Stage:
    w, n = _weight_bytes(cfg), cfg.resources.num_workers
    trained = _trained(cfg, shape)
    state = w * shape.params + (ADAM_STATE - 1) * w * trained
    per_worker = math.ceil(cfg.cycles.batch_size / n)
    parts = {"activations": _activation_bytes(cfg, shape, per_worker)}
    parts["logits"] = 3 * 4 * per_worker * cfg.model.max_length * shape.vocab  # +softmax, grad
    if cfg.resources.strategy == "fsdp" and n > 1:
        parts["sharded state"] = state / n
        parts["gathered blocks"] = 2 * w * shape.block_params
        return Stage("fine-tune", parts, "resources.num_workers", _finetune_advice(cfg))
    parts["weights+grads+adam"] = state
    parts["ddp buckets"] = w * trained if n > 1 else 0.0
    if cfg.resources.strategy == "fsdp":  # over one worker: nothing to shard over
        return Stage("fine-tune", parts, "resources.num_workers", _finetune_advice(cfg))
    return Stage("fine-tune", parts, "resources.strategy", _finetune_advice(cfg))


def _finetune_advice(cfg: Config) -> str:
    if cfg.resources.strategy == "ddp":
        return "resources.strategy=fsdp shards it over the workers"
    return (
        "more workers (resources.num_workers), resources.activation_checkpointing=true or "
        "a smaller cycles.batch_size"
    )


def _sae_params(d: int, latents: int) -> int:
    return 2 * d * latents + latents + d


def plan(cfg: Config, shape: Shape, latents: int, k: int, examples: int) -> Plan:
    """Each stage's bytes per worker for the largest SAE the sweep may sample (`latents`,
    `k`) on `examples` examples (train + validation + test)."""
    w, n, d = _weight_bytes(cfg), cfg.resources.num_workers, shape.hidden
    model = w * shape.params
    stages = []
    if cfg.cycles.count > 1 or cfg.cycles.start_from == "finetune":
        stages.append(_finetune(cfg, shape))
    hidden = 64 * cfg.model.max_length * d * 4 * 2  # EXTRACT_BATCH rows, hooked + next block
    tokens = cfg.model.max_length * shape.vocab  # a row's logits (causal LM), in elements
    stages.append(
        Stage(
            "extraction",
            {
                "model": model,
                "batch": hidden,
            },
            "model.dtype",
            "model.dtype=bfloat16 halves the weights",
        )
    )
    sae_batch = math.ceil(cfg.sae.batch_size / n)
    stages.append(
        Stage(
            "SAE fit",
            {
                "SAE+grads+adam": SAE_STATE * _sae_params(d, latents),
                "batch": 3 * 4 * sae_batch * latents,
            },
            "sae.batch_size",
            "a smaller sae.batch_size or sae.expansion_factor",
        )
    )
    stages.append(
        Stage(
            "evaluation",
            {
                "model": model,
                "SAE": 4 * _sae_params(d, latents),
                "codes (n x k)": 8 * examples * k,
                "pooled activations": 4 * examples * d,
                # clean and spliced logits with their softmax, one LM evaluation batch
                "logits": 3 * 4 * lm_batch_rows(cfg.model.max_length) * tokens,
            },
            "model.dtype",
            "model.dtype=bfloat16 halves the weights",
        )
    )
    device = cfg.resources.gpu_memory_gb if cfg.resources.use_gpu else None
    notes = [f"loading: every worker reads the whole model into host memory ({_size(model)})"]
    return Plan(stages, device, notes)
