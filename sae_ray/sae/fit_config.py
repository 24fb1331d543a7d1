"""What one SAE fit needs: the SAE's own config (the sweep's `sae` section, `config.Sae`)
plus where and how this fit runs (hookpoints, width, loss, seeds, logging), and the other
SAEs co-trained on the same stream (`variants`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from sae_ray.config import PER_SAE, Sae, one_line
from sae_ray.lm.hookpoints import INPUT
from sae_ray.lm.hookpoints import columns as columns_of
from sae_ray.lm.hookpoints import source as source_column
from sae_ray.sae.model import default_lr

# Per SAE of a fit: the SAE config's own settings, and the seed of its initial weights
# (several init seeds: one SAE each on one stream, the spread that is the SAE's alone).
PER_FIT = (*PER_SAE, "init_seed")


class SaeTrainConfig(Sae):
    hookpoints: list[str] = Field(min_length=1)
    d_in: int = Field(ge=1)
    widths: dict[str, int] = Field(
        default_factory=dict, description="each column's width where it is not d_in"
    )
    loss_fn: Literal["fvu", "mse", "ce", "kl"] = Field(
        "fvu", description="ce / kl: end to end, the SAE spliced into the model's forward"
    )
    log_every: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop early (resumable) after this")
    init_seed: int = 42
    shuffle_seed: int = 42
    shuffle_buffer_tokens: int = Field(
        0, ge=0, description="rows of a streamed set's shuffle window; 0 keeps the stored order"
    )
    autocast: bool = Field(True, description="bf16 autocast of the encoder on a CUDA device")
    progress: bool = True
    log_to_wandb: bool = False
    wandb_project: str = "sae-ray"
    run_name: str = "sae"
    sweep: str = Field("", description="tag of the dashboard metrics (default: run_name)")
    variants: list[dict[str, Any]] = Field(
        default_factory=list,
        description="co-trained SAEs: each entry overrides the SAE's own settings "
        f"({', '.join(PER_FIT)}) for one SAE per hookpoint, all fed by one stream",
    )

    @model_validator(mode="after")
    def _fits(self) -> SaeTrainConfig:
        if self.normalize_activations and self.loss_fn in ("ce", "kl"):
            raise ValueError(
                f"normalize_activations: an end-to-end fit (loss_fn {self.loss_fn}) splices "
                "the SAE into the model's own activations; normalise a reconstruction fit"
            )
        if self.transcode and self.loss_fn in ("ce", "kl"):
            raise ValueError(
                f"transcode: an end-to-end fit (loss_fn {self.loss_fn}) splices autoencoders "
                "at block outputs; train a transcoder on stored activations (fvu, mse)"
            )
        reads_input = [hp for hp in self.hookpoints if hp.endswith(INPUT)]
        if self.transcode and reads_input:
            raise ValueError(
                f"transcode: a transcoder maps a module's input to its output: name the "
                f"module ({reads_input[0].removesuffix(INPUT)}), not its input"
            )
        if self.variants and self.loss_fn in ("ce", "kl"):
            raise ValueError(
                f"variants: an end-to-end fit (loss_fn {self.loss_fn}) splices one SAE per "
                "hookpoint into the model; co-train reconstruction fits (fvu, mse)"
            )
        try:
            for cfg in self.members().values():
                cfg.check_fits(cfg.d_in)
        except ValidationError as err:  # a variant's own value, checked by its config
            raise ValueError(f"variants: {one_line(err)}") from None
        except ValueError as err:
            raise ValueError(f"variants: {err}" if self.variants else str(err)) from None
        return self

    def members(self) -> dict[str, SaeTrainConfig]:
        """Every SAE of the fit by where it is saved: `<hookpoint>` alone, or
        `<variant>/<hookpoint>` with variants (each variant folder is then a run sparsify
        loads). Each member is this config with its variant's settings and one hookpoint."""
        if not self.variants:
            return {hp: self._at(hp) for hp in self.hookpoints}
        out = {}
        for override in self.variants:
            bad = sorted(set(override) - set(PER_FIT))
            if bad:
                raise ValueError(f"{bad[0]} is shared by the stream, not per SAE")
            member = type(self)(**{**self.model_dump(), **override, "variants": []})
            for hp in self.hookpoints:
                out[f"{variant_name(override)}/{hp}"] = member._at(hp)
        if len(out) != len(self.variants) * len(self.hookpoints):
            raise ValueError("two entries are the same SAE")
        return out

    def _at(self, hp: str) -> SaeTrainConfig:
        """This config for the one SAE at `hp`, its width that of the column it reads."""
        return self.model_copy(update={"hookpoints": [hp], "d_in": self.width(self.source(hp))})

    def source(self, hp: str | None = None) -> str:
        """The column the SAE at `hp` (a member's own by default) reads: a transcoder's is
        its module's input."""
        return source_column(hp or self.hookpoints[0], self.transcode)

    def target(self, hp: str | None = None) -> str:
        """The column it reconstructs (a transcoder: its module's output)."""
        return hp or self.hookpoints[0]

    def columns(self) -> list[str]:
        """Every column the fit reads, each once."""
        return columns_of(self.hookpoints, self.transcode)

    def width(self, column: str) -> int:
        return self.widths.get(column, self.d_in)

    @property
    def latents(self) -> int:
        return self.latents_for(self.d_in)

    @property
    def learning_rate(self) -> float:
        return self.lr or default_lr(self.latents)


SHORT = {
    "k": "k",
    "expansion_factor": "x",
    "num_latents": "latents",
    "architecture": "",
    "init_seed": "seed",
}


def variant_name(override: dict[str, Any]) -> str:
    """A variant's folder: `k16-x4` for {k: 16, expansion_factor: 4}, `batchtopk-k16`."""
    parts = []
    for key, value in override.items():
        text = "_".join(map(str, value)) if isinstance(value, list) else str(value)
        parts.append(f"{SHORT.get(key, key)}{text}")
    return "-".join(parts) or "base"
