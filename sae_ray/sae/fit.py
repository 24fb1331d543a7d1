"""Where one worker's SAE fit stands (`Fit`): what the trainer's loop advances, its log
reads and its checkpoints save."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sae_ray.sae.checkpoints import Progress
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.model import SparseAutoencoder
from sae_ray.sae.training import DeadTracker


@dataclass
class Fit:
    """One worker's fit: the SAEs (one per hookpoint) with their optimizers and dead-latent
    windows, where the run is, and this run's clock (for its tokens/s)."""

    cfg: SaeTrainConfig
    saes: dict[str, SparseAutoencoder]
    opts: dict[str, torch.optim.Optimizer]
    trackers: dict[str, DeadTracker]
    progress: Progress
    rank: int
    budget: int
    save_dir: Path | None
    started: float = field(default_factory=time.perf_counter)
    started_tokens: int = 0
    resumed_from: int = 0
    restored: bool = False  # from a checkpoint: b_dec comes with it
    models: dict[str, torch.nn.Module] = field(default_factory=dict)  # DDP-wrapped
    members: dict[str, SaeTrainConfig] = field(default_factory=dict)  # each SAE's config
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    micro: int = 0
    finished: bool = False  # its last step is taken: what it saves is what it publishes
    steps: int = 1  # the fit's optimizer steps, for the learning-rate schedule
    # what a checkpoint is handed to: Ray Train's report (`train-sae`), or the trial's
    # storage when the fit is one stage of a trial's Train run
    save: Callable[[Fit], None] | None = None

    def done(self) -> bool:
        p, cfg = self.progress, self.cfg
        return p.tokens >= self.budget or bool(cfg.max_steps and p.step >= cfg.max_steps)

    def published(self) -> dict[str, SparseAutoencoder]:
        """The SAEs as a checkpoint saves them: trained on normalised activations, a fit
        that spent its budget saves ones that take raw activations (each hookpoint's scale
        folded in); before that, and at a `max_steps` stop, training's weights, which a
        resume continues from (the scale is in the checkpoint's state)."""
        scales = self.progress.scales
        if not scales or not (self.finished or self.progress.tokens >= self.budget):
            return self.saes
        out = {}
        for key, sae in self.saes.items():
            m = self.members[key]
            out[key] = copy.deepcopy(sae).fold_input_scale(scales[m.source()], scales[m.target()])
        return out

    def rate(self) -> float:
        return (self.progress.tokens - self.started_tokens) / (time.perf_counter() - self.started)
