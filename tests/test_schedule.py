"""The SAE's learning-rate schedule: its rates equal torch's schedulers' (LinearLR warm-up,
then LinearLR / CosineAnnealingLR decay, chained by SequentialLR), and the trainer applies
it at every optimizer step of a fit."""

from __future__ import annotations

import pytest
import torch

from sae_ray.sae import trainer
from sae_ray.sae.fit_config import SaeTrainConfig
from sae_ray.sae.schedule import lr_factor, total_steps

BASE = 3e-4


def _torch_rates(warmup: int, total: int, decay: str, end: float = 0.0) -> list[float]:
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=BASE)
    span = total - warmup
    after = {
        "constant": lambda: LinearLR(opt, 1.0, 1.0, total_iters=1),
        "linear": lambda: LinearLR(opt, 1.0, end, total_iters=span),
        "cosine": lambda: CosineAnnealingLR(opt, T_max=span, eta_min=BASE * end),
    }
    if warmup:
        warm = LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=warmup)
        sched = SequentialLR(opt, [warm, after[decay]()], milestones=[warmup])
    else:
        sched = after[decay]()
    rates = []
    for _ in range(total):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return rates


@pytest.mark.parametrize("end", [0.0, 0.1])
@pytest.mark.parametrize("decay", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_rates_equal_torchs_schedulers(warmup, decay, end):
    total = 40
    ours = [BASE * lr_factor(s, warmup, total, decay, end) for s in range(total)]
    assert ours == pytest.approx(_torch_rates(warmup, total, decay, end), rel=1e-6, abs=1e-12)


def _fit_seen(monkeypatch, read, **settings):
    """A small fit (640 rows of 8, batches of 64) and what `read(sae)` gave at each of
    its optimizer steps, with its result."""
    seen: list = []
    real = trainer.optimizer_step

    def record(sae, opt):
        seen.append(read(sae, opt))
        real(sae, opt)

    monkeypatch.setattr(trainer, "optimizer_step", record)
    base = {"hookpoints": ["h"], "d_in": 8, "k": 2, "expansion_factor": 2, "batch_size": 64}
    cfg = SaeTrainConfig(**base, progress=False, **settings)
    x = torch.randn(640, 8, generator=torch.Generator().manual_seed(0))
    return seen, trainer.fit_in_process({"h": x}, cfg)


def test_a_fit_follows_the_schedule_at_every_step(monkeypatch):
    seen, _ = _fit_seen(
        monkeypatch,
        lambda sae, opt: opt.param_groups[0]["lr"],
        epochs=2,
        lr=1e-3,
        lr_warmup_steps=3,
        lr_decay="cosine",
        lr_end_factor=0.1,
    )
    steps = total_steps(2 * 640, 64, 1)
    assert len(seen) == steps == 20
    expected = [1e-3 * lr_factor(s, 3, steps, "cosine", 0.1) for s in range(steps)]
    assert seen == pytest.approx(expected)
    assert seen[-1] > 1e-4  # the floor: lr x 0.1, reached after the last step
    assert seen[0] == pytest.approx(1e-3 / 3) and seen[3] == pytest.approx(1e-3)


def test_k_anneals_linearly_to_k_on_a_hand_case():
    from sae_ray.sae.schedule import k_at

    assert [k_at(s, 4, 20, 8) for s in range(11)] == [20, 18, 16, 14, 12, 10, 8, 6, 4, 4, 4]
    assert [k_at(s, 4, None, 8) for s in range(3)] == [4, 4, 4]  # no annealing


def test_a_fit_anneals_k_step_by_step_and_ends_at_k(monkeypatch):
    """The k each step's forward used, read at its optimizer step; the saved SAE's k is k."""
    seen, result = _fit_seen(
        monkeypatch, lambda sae, opt: sae.cfg.k, epochs=2, k_anneal_from=10, k_anneal_steps=8
    )
    assert seen == [10, 9, 8, 7, 6, 5, 4, 3] + [2] * 12
    assert result.saes["h"].cfg.k == 2 and result.metrics["l0/h"] <= 2


def test_k_anneal_from_is_checked_against_the_dictionary():
    from sae_ray.config import Sae

    with pytest.raises(ValueError, match="k_anneal_from: 1 must lie between k"):
        Sae(k=4, k_anneal_from=1).check_fits(8)
    with pytest.raises(ValueError, match="k_anneal_from: 99"):
        Sae(k=4, k_anneal_from=99, expansion_factor=2).check_fits(8)


def test_the_l0_coefficient_warms_up_as_saelens_does(monkeypatch):
    """SAELens's l0 warm-up: coefficient x min(1, (step + 1) / steps); read in each step's
    loss, the saved SAE ends at the full coefficient."""
    from sae_ray.sae.schedule import warmed

    assert [warmed(0.5, s, 4) for s in range(6)] == [0.125, 0.25, 0.375, 0.5, 0.5, 0.5]
    seen, result = _fit_seen(
        monkeypatch,
        lambda sae, opt: sae.cfg.l0_coefficient,
        epochs=1,
        architecture="jumprelu",
        l0_coefficient=0.01,
        l0_warmup_steps=4,
    )
    assert seen == pytest.approx([0.0025, 0.005, 0.0075] + [0.01] * 7)
    assert result.saes["h"].cfg.l0_coefficient == 0.01
