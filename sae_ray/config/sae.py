"""The sweep YAML's `sae` section: the one SAE config, which is also `sae-ray train-sae`'s
flags and the trainer's (`sae.fit_config.SaeTrainConfig` adds only where and how a fit
runs)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from sae_ray.config.base import Section


def saetrain(default: object = None, flag: str | None = "", hidden: bool = False) -> dict:
    """How `sae-ray train-sae` offers a field, kept with the field (`json_schema_extra`):
    the saetrain tool's own default and spelling where they differ, or no flag at all."""
    extra: dict = {}
    if default is not None:
        extra["saetrain_default"] = default
    if flag:
        extra["flag"] = flag
    if hidden:
        extra["flag"] = None
    return {"json_schema_extra": extra}


# The architectures a config may name: the registry's (`sae/archs/`), spelled here too so
# that a sweep YAML is checked without importing torch (a test keeps the two equal).
Architecture = Literal["topk", "batchtopk", "jumprelu", "matryoshka"]


class Sae(Section):
    """The one SAE config: the sweep's `sae` section, `sae-ray train-sae`'s flags (the same
    names, but `--dead_window_tokens` for `dead_tokens` and the saetrain tool's defaults, as
    each field's `saetrain(...)` says) and the trainer's (`sae.fit_config.SaeTrainConfig` adds only
    where and how a fit runs)."""

    architecture: Architecture = Field(
        "topk",
        description="topk: k per token; batchtopk: k per token on average over the batch "
        "(a threshold at inference); jumprelu: learned per-latent thresholds and an L0 "
        "penalty; matryoshka: batchtopk with nested prefix reconstructions",
    )
    k: int = Field(32, ge=1, description="active latents per token", **saetrain(192))
    expansion_factor: int = Field(8, ge=1, description="latents = d_in x this", **saetrain(32))
    k_anneal_from: int | None = Field(
        None, ge=1, description="k annealing: the k of the first step, decayed linearly to k"
    )
    k_anneal_steps: int = Field(
        0, ge=0, description="steps of that decay (0: no annealing; at most the fit's steps)"
    )
    num_latents: int | None = Field(None, ge=1, description="latents (overrides expansion_factor)")
    epochs: int = Field(
        1,
        ge=1,
        description="passes over the activations (without max_tokens)",
        **saetrain(hidden=True),  # train-sae's budget is --max_tokens
    )
    batch_size: int = Field(
        1024,
        ge=1,
        description="tokens per SAE step, all workers",
        **saetrain(hidden=True),  # train-sae's batch is sequences x ctx_len
    )
    lr: float | None = Field(
        None, gt=0, description="learning rate (default: 2e-4 / sqrt(latents / 2^14))"
    )
    lr_warmup_steps: int = Field(
        0, ge=0, description="steps of linear warm-up from lr / steps to lr (SAELens's)"
    )
    lr_decay: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="after the warm-up: constant, or linear / cosine decay to lr x "
        "lr_end_factor at the last step",
    )
    lr_end_factor: float = Field(
        0.0,
        ge=0,
        le=1,
        description="where a decay ends, as a fraction of lr (torch's end_factor / eta_min; "
        "SAELens's lr_end is lr x this)",
    )
    auxk_alpha: float = Field(1 / 32, ge=0, description="weight of the AuxK loss on dead latents")
    l0_coefficient: float = Field(
        1e-3, ge=0, description="jumprelu: L0 penalty per active latent, in FVU units"
    )
    l0_warmup_steps: int = Field(
        0,
        ge=0,
        description="jumprelu: steps over which the L0 coefficient rises linearly "
        "from 0 (SAELens's l0_warm_up_steps)",
    )
    target_l0: float | None = Field(
        None, gt=0, description="jumprelu: hold L0 near T by l0_coefficient x 2/T x (L0 - T)^2"
    )
    matryoshka_widths: list[int] | None = Field(
        None,
        description="matryoshka: the nested prefixes' widths (default: latents/8, /4, /2)",
        **saetrain(hidden=True),
    )
    dead_tokens: int = Field(
        100_000,
        ge=1,
        description="window of tokens over which firing is counted",
        **saetrain(10_000_000, flag="dead_window_tokens"),
    )
    dead_percentage_threshold: float = Field(
        0.0,
        ge=0,
        le=1,
        description="dead: fires on fewer than this fraction of the window",
        **saetrain(0.0005),
    )
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="SAE optimizer")
    weight_decay: float = Field(0.0, ge=0, description="optimizer weight decay")
    grad_acc_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    max_tokens: int | None = Field(
        None, ge=1, description="global token budget; else epochs", **saetrain(1_000_000)
    )
    normalize_activations: bool = Field(
        False,
        description="train on activations scaled to E‖x‖ = √d (SAELens's "
        "expected_average_only_in), the scale estimated on the first batch; the saved SAE "
        "folds it in and takes raw activations",
    )
    transcode: bool = Field(
        False,
        description="a transcoder: predict each hooked module's output from its input "
        "(sparsify's transcode; SAELens loads the export) instead of reconstructing it",
    )
    skip_connection: bool = Field(
        False, description="a transcoder's linear skip term W_skip x beside its latents"
    )
    exclude_tokens: list[int] = Field(
        default_factory=list,
        description="token ids left out of SAE training and its metrics (sparsify's "
        "exclude_tokens): never stored as token rows, never spliced end to end",
    )
    exclude_special_tokens: bool = Field(
        False,
        description="leave out the tokenizer's special tokens too (BOS, EOS, CLS, SEP, PAD): "
        "one token an SAE would otherwise spend latents and FVU on",
    )
    activation_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto",
        description="how stored activations are kept: auto is float16 for a model that runs "
        "in bfloat16 or float16 (half the bytes to store and read; the SAE computes in "
        "float32), else float32",
    )
    feed: Literal["workers", "ray_data"] = Field(
        "workers",
        description="how stored activations reach the SAE's workers. workers: each reads its "
        "own share of the shards with pyarrow (held after one read when the set fits in "
        "memory, streamed each epoch when not; every worker reaches the run's storage, as on "
        "any cluster). ray_data: streamed through Ray Data's read tasks and object store "
        "(a ninth of the workers' stream's rate here: docs/performance.md)",
    )
    save_every: int = Field(
        1000, ge=1, description="SAE steps between checkpoints (a worker fault resumes there)"
    )

    def stored_dtype(self, model_dtype: str) -> str:
        """The dtype activations are stored in, for a model whose weights are `model_dtype`."""
        return stored_activation_dtype(self.activation_dtype, model_dtype)

    def excluded_ids(self, tokenizer) -> list[int]:
        """The token ids this SAE never sees, with the tokenizer's special ones if asked."""
        special = getattr(tokenizer, "all_special_ids", []) if self.exclude_special_tokens else []
        return sorted(set(self.exclude_tokens) | set(special))

    def latents_for(self, d_in: int) -> int:
        return self.num_latents or d_in * self.expansion_factor

    def check_fits(self, d_in: int) -> None:
        """The one place k and the prefixes are checked against the dictionary (ValueError
        naming the field)."""
        latents = self.latents_for(d_in)
        if self.k > latents:
            raise ValueError(f"k: {self.k} is larger than the {latents} latents")
        start = self.k_anneal_from
        if start is not None and not self.k <= start <= latents:
            raise ValueError(
                f"k_anneal_from: {start} must lie between k ({self.k}) and the {latents} latents"
            )
        if self.target_l0 is not None and self.architecture != "jumprelu":
            raise ValueError(
                f"target_l0: only a jumprelu has an L0 penalty, not {self.architecture}"
            )
        if self.target_l0 is not None and self.target_l0 > latents:
            raise ValueError(f"target_l0: {self.target_l0:g} is more than the {latents} latents")
        if self.skip_connection and not self.transcode:
            raise ValueError("skip_connection: only a transcoder (transcode) has a skip term")
        if self.skip_connection and self.architecture == "matryoshka":
            raise ValueError(
                "skip_connection: a matryoshka's prefixes would each need the skip term; "
                "a skip transcoder is topk, batchtopk or jumprelu"
            )
        widths = self.matryoshka_widths or []
        if widths and (
            widths != sorted(set(widths)) or widths[0] < self.k or widths[-1] >= latents
        ):
            raise ValueError(
                f"matryoshka_widths: {widths} must increase, from at least k ({self.k}) to "
                f"below the {latents} latents (the whole dictionary is the last level)"
            )


def stored_activation_dtype(setting: str, model_dtype: str) -> str:
    """`activation_dtype` resolved: "auto" halves the bytes where the model runs in half
    precision anyway (a bfloat16 model's activations carry 8 bits of mantissa; float16
    keeps 10, and the extraction refuses one that overflows it)."""
    if setting != "auto":
        return setting
    return "float16" if model_dtype.removeprefix("torch.") in ("bfloat16", "float16") else "float32"


# Rows of each worker's local shuffle buffer in a sweep's SAE fits (and train-sae's default):
# stored rows come example by example, a run of consecutive tokens of one text.
SHUFFLE_BUFFER_TOKENS = 16384

# The settings that make one SAE differ from another on the same stream (co-trained SAEs,
# `train-sae --k 16 32`); the rest (batch, budget, epochs, checkpoints) is the stream's.
PER_SAE = (
    "architecture",
    "k",
    "k_anneal_from",
    "k_anneal_steps",
    "expansion_factor",
    "num_latents",
    "lr",
    "lr_warmup_steps",
    "lr_decay",
    "lr_end_factor",
    "auxk_alpha",
    "dead_tokens",
    "dead_percentage_threshold",
    "optimizer",
    "weight_decay",
    "l0_coefficient",
    "l0_warmup_steps",
    "target_l0",
    "matryoshka_widths",
)
