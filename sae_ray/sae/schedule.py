"""An SAE's schedules: its k (annealed from a larger one), and its learning rate: linear
warm-up from lr / warm-up steps to lr, then constant, or linear or cosine decay to
lr x lr_end_factor (0 by default) at the fit's last step (torch's `LinearLR` then
`LinearLR` / `CosineAnnealingLR`, chained as `SequentialLR` chains them; a test checks
the two agree). A pure function of the step, so a resumed fit continues the schedule
exactly where its checkpoint left it."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, warmup: int, total: int, decay: str, end: float = 0.0) -> float:
    """The factor on the base learning rate at optimizer step `step` (0-based) of `total`;
    a decay ends at `end`."""
    if step < warmup:
        return 1 / warmup + (1 - 1 / warmup) * step / warmup
    if decay == "constant":
        return 1.0
    span = max(total - warmup, 1)
    done = min(step - warmup, span) / span
    if decay == "linear":
        return 1.0 - (1.0 - end) * done
    return end + (1.0 - end) * 0.5 * (1 + math.cos(math.pi * done))


def k_at(step: int, k: int, start: int | None, steps: int) -> int:
    """k annealing: `start` at step 0, linearly down to `k` at step `steps`, then `k`."""
    if start is None or steps <= 0:
        return k
    return round(start + (k - start) * min(step, steps) / steps)


def warmed(value: float, step: int, steps: int) -> float:
    """A coefficient's warm-up: linearly from 0 to `value` over `steps` (SAELens's rule,
    (step + 1) / steps), then `value`."""
    return value if steps <= 0 else value * min(1.0, (step + 1) / steps)


def total_steps(budget_tokens: int, batch_tokens: int, grad_acc_steps: int) -> int:
    """Optimizer steps in a fit of `budget_tokens` (batches of `batch_tokens`)."""
    return max(1, math.ceil(budget_tokens / (batch_tokens * grad_acc_steps)))


def set_lr(opt: torch.optim.Optimizer, base: float, factor: float) -> None:
    for group in opt.param_groups:
        group["lr"] = base * factor
