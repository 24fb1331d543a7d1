"""One SAE training step under DDP: the loss (FVU or MSE + AuxK, normalised by the union
batch's variance so N workers take the step one worker takes on their union), the
dead-latent window, the optimizer and the unit-norm decoder update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_ray.distributed.ranks import all_reduce
from sae_ray.sae.model import SparseAutoencoder, auxk_loss


def global_total_variance(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Σ‖x − μ‖² of the union of every worker's batch, and its row count.

    Normalising each worker's squared error by the union's variance (not its own) makes the
    DDP-averaged gradient equal to the gradient of the union batch's FVU.
    """
    x64 = x.detach().double()
    stats = torch.cat([x64.sum(0), x64.pow(2).sum().view(1), x64.new_tensor([len(x)])])
    stats = all_reduce(stats)
    total, sq, n = stats[:-2], stats[-2], stats[-1]
    return (sq - total.pow(2).sum() / n).clamp_min(1e-12).float(), int(n.item())


@dataclass
class DeadTracker:
    """Firing counts over a sliding window of tokens (all workers), for AuxK and dead %.

    A latent is dead when, over the last one to two windows, it fired on fewer than
    `threshold` of the tokens (and at least once is always required). Nothing is dead before
    a first full window: a fresh latent has not had its chance yet.
    """

    fires: torch.Tensor  # (latents,) int64, current window
    window: int
    threshold: float = 0.0
    prev_fires: torch.Tensor | None = None
    tokens: int = 0
    prev_tokens: int = 0

    def update(self, indices: torch.Tensor, values: torch.Tensor, n_global: int) -> None:
        counts = torch.bincount(indices[values > 0], minlength=len(self.fires))
        self.fires += all_reduce(counts.to(self.fires.dtype))
        self.tokens += n_global
        if self.tokens >= self.window:
            self.prev_fires, self.prev_tokens = self.fires.clone(), self.tokens
            self.fires.zero_()
            self.tokens = 0

    def dead(self) -> torch.Tensor:
        if self.prev_fires is None:
            return torch.zeros_like(self.fires, dtype=torch.bool)
        seen = self.tokens + self.prev_tokens
        return (self.fires + self.prev_fires) < max(self.threshold * seen, 1.0)

    def tensors(self) -> dict[str, torch.Tensor]:
        prev = self.prev_fires if self.prev_fires is not None else torch.zeros_like(self.fires)
        counts = torch.tensor([self.tokens, self.prev_tokens, int(self.prev_fires is not None)])
        return {"fires": self.fires, "prev_fires": prev, "token_counts": counts}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.fires.copy_(tensors["fires"])
        self.tokens, self.prev_tokens, has_prev = (int(v) for v in tensors["token_counts"])
        self.prev_fires = tensors["prev_fires"].to(self.fires) if has_prev else None


def make_optimizer(
    name: str, params, lr: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """Adam is the fused kernel (one pass over the parameters: 15x faster than the default
    on CPU, and the fastest on CUDA)."""
    params = list(params)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, eps=6.25e-10, weight_decay=weight_decay, fused=True)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, eps=6.25e-10, weight_decay=weight_decay, fused=True)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def sae_loss(
    model: torch.nn.Module,
    sae: SparseAutoencoder,
    x: torch.Tensor,
    tracker: DeadTracker,
    auxk_alpha: float,
    world: int = 1,
    loss_fn: str = "fvu",
    y: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """This worker's share of the union batch's FVU (or MSE per token) + α·AuxK, already
    × world for DDP; of `y` predicted from `x` for a transcoder (sparsify's: the FVU of its
    target)."""
    dead = tracker.dead()
    x_hat, codes = model(x, dead)
    y = x if y is None else y
    total_var, n_global = global_total_variance(y)
    loss_fvu = (y - x_hat).pow(2).sum() / total_var
    aux = auxk_loss(sae, y, x_hat, codes, int(dead.sum()), total_variance=total_var)
    sq_err = sae.arch.squared_error(sae, y, x_hat, codes)  # Matryoshka: its prefixes'
    main = sq_err / total_var if loss_fn == "fvu" else sq_err / n_global
    if codes.penalty is not None:  # jumprelu: the union batch's mean L0, weighted
        main = main + sae.cfg.l0_coefficient * codes.penalty / n_global
    # DDP averages gradients over workers; scaling by world size turns that into the sum.
    loss = world * (main + auxk_alpha * aux)
    with torch.no_grad():
        tracker.update(codes.indices, codes.values, n_global)
        fvu_global = all_reduce(loss_fvu.detach().clone()).item()
    return loss, {
        "loss": fvu_global + auxk_alpha * aux.item(),
        "fvu": fvu_global,
        "auxk": aux.item(),
        "l0": (codes.values > 0).sum().item() / len(x),  # padded or CSR codes alike
        "dead_pct": 100.0 * dead.float().mean().item(),
        "tokens": n_global,
    }


def optimizer_step(sae: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    """Step, keeping decoder rows on the unit sphere (sparsify's recipe; works for its
    SparseCoder too, which has the same two decoder methods)."""
    sae.remove_gradient_parallel_to_decoder_directions()
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sae.set_decoder_norm_to_unit_norm()


def apply_update(sae: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    loss.backward()
    optimizer_step(sae, opt)


def train_step(
    model: torch.nn.Module,
    sae: SparseAutoencoder,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    tracker: DeadTracker,
    auxk_alpha: float,
    world: int = 1,
) -> dict[str, float]:
    """One SAE update on this worker's batch; under DDP the step is the union batch's step."""
    loss, stats = sae_loss(model, sae, x, tracker, auxk_alpha, world)
    apply_update(sae, opt, loss)
    return stats
