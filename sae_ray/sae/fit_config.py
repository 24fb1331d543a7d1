"""What one SAE fit needs: the SAE's own config (the sweep's `sae` section, `config.Sae`)
plus where and how this fit runs (hookpoints, width, loss, seeds, logging)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from sae_ray.config import Sae
from sae_ray.sae.model import default_lr


class SaeTrainConfig(Sae):
    hookpoints: list[str] = Field(min_length=1)
    d_in: int = Field(ge=1)
    loss_fn: Literal["fvu", "mse", "ce", "kl"] = Field(
        "fvu", description="ce / kl: end to end, the SAE spliced into the model's forward"
    )
    log_every: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop early (resumable) after this")
    init_seed: int = 42
    shuffle_seed: int = 42
    shuffle_buffer_tokens: int = Field(0, ge=0, description="0 keeps the stored order")
    autocast: bool = Field(True, description="bf16 autocast of the encoder on a CUDA device")
    progress: bool = True
    log_to_wandb: bool = False
    wandb_project: str = "sae-ray"
    run_name: str = "sae"
    sweep: str = Field("", description="tag of the dashboard metrics (default: run_name)")

    @model_validator(mode="after")
    def _fits(self) -> SaeTrainConfig:
        self.check_fits(self.d_in)
        return self

    @property
    def latents(self) -> int:
        return self.latents_for(self.d_in)

    @property
    def learning_rate(self) -> float:
        return self.lr or default_lr(self.latents)
