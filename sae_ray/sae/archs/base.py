"""What an SAE architecture decides (`Architecture`), and the registry of them by name.

An architecture shares TopK's parameters (`encoder`, `W_dec` with unit rows, `b_dec`), its
AuxK on dead latents and its `Codes`, and decides the rest: the parameters and buffers it
adds, how it starts from the first batch, how it encodes in training and at inference,
what its loss reconstructs, how SAELens loads it, and which config it accepts."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from sae_ray.sae.codes import Codes


class Architecture:
    name: ClassVar[str]
    fixed_l0: ClassVar[bool] = False  # every code has exactly k active latents (TopK)
    uses_target_l0: ClassVar[bool] = False
    saelens_name: ClassVar[str] = "jumprelu"  # SAELens's class it saves as (`saelens`)

    def check(self, cfg: Any) -> None:
        """Refuse a config this architecture cannot train (`cfg`: the model's SaeConfig)."""
        if cfg.target_l0 is not None and not self.uses_target_l0:
            raise ValueError(f"target_l0: {self.name} has no L0 penalty")

    def add_parameters(self, sae: nn.Module) -> None:
        """Parameters and buffers beyond TopK's (registered on `sae`)."""

    def init_from_data(self, sae: nn.Module, x: torch.Tensor) -> None:
        """After b_dec is the first batch's mean: whatever else the first batch sets."""

    def encode(self, sae: nn.Module, x: torch.Tensor, dead: torch.Tensor | None) -> Codes:
        """The codes (training's rule in training mode), with AuxK's candidates of `dead`."""
        raise NotImplementedError

    def squared_error(self, sae: nn.Module, x: torch.Tensor, x_hat: torch.Tensor, codes: Codes):
        """What the loss's reconstruction term sums: ‖x − x̂‖² (Matryoshka: its prefixes')."""
        return (x - x_hat).pow(2).sum()

    def saelens(self, sae: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """How SAELens loads it (as `saelens_name`): its config keys and extra tensors."""
        raise NotImplementedError

    def fold_scale(self, sae: nn.Module, scale: float) -> None:
        """Pre-activations are divided by `scale` (`SparseAutoencoder.fold_input_scale`):
        whatever they are compared with (a threshold) follows."""


ARCHITECTURES: dict[str, Architecture] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    """Class decorator: make `cls` the architecture called `cls.name`."""
    ARCHITECTURES[cls.name] = cls()
    return cls


def architecture(name: str) -> Architecture:
    if name not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"architecture: {name!r} is not an SAE sae-ray knows ({known})")
    return ARCHITECTURES[name]
