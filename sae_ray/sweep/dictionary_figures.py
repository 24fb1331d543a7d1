"""The report's figures of the SAEs' dictionaries: each strategy's feature-density
histogram at the final cycle (SAEBench's), and the seed's structure comparison with the
control's SAE cycle by cycle. Each writes a PNG and returns its file name, or None when
the sweep reported nothing to draw."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sae_ray.config import CONTROL  # noqa: E402
from sae_ray.config.metrics import OVERLAP  # noqa: E402
from sae_ray.sweep.figures import COLORS, Sweep, save_figure  # noqa: E402
from sae_ray.sweep.results import final_rows  # noqa: E402

HIST = "features/log10_density_hist"
# (results.csv column, panel title): how each strategy's SAE differs from its control's
STRUCTURE = [
    (OVERLAP, "dictionary overlap with the control's SAE (1 = same features)"),
    ("delta/features/firing_gini", "Δ firing Gini (concentration of firing)"),
    ("delta/features/decoder_silhouette", "Δ decoder clustering (silhouette)"),
    ("delta/features/mean_max_decoder_cos", "Δ mean max decoder cosine"),
]


def _bin_labels(count: int) -> list[str]:
    """The histogram's bins as `density_stats` counts them: dead, then half decades."""
    edges = np.arange(-6.0, 0.5, 0.5)[:count]
    return ["dead", *(f"1e{e:g}" for e in edges[: count - 1])]


def plot_density(sweep: Sweep, out: Path) -> str | None:
    """Final-cycle log10 firing density, the fraction of each strategy's latents per bin
    (its trials' SAEs pooled, every seed's from seeds.csv; results.csv holds the first
    seed's): where the dead and the dense latents are."""
    seeded = sweep.seeds is not None and HIST in sweep.seeds
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    if HIST not in final:
        return None
    if seeded:  # each trial's seeds at its final cycle
        last = final.set_index("trial_id")["cycle"]
        seeds = sweep.seeds[sweep.seeds["trial_id"].isin(last.index)]
        final = seeds[seeds["cycle"] == seeds["trial_id"].map(last)]
    per_strategy: dict[str, np.ndarray] = {}
    for strategy, rows in final.groupby("strategy_effective", sort=True):
        hists = [np.asarray(json.loads(h), float) for h in rows[HIST] if isinstance(h, str)]
        if hists:
            total = np.sum(hists, axis=0)
            per_strategy[strategy] = total / max(total.sum(), 1)
    if not per_strategy:
        return None
    bins = len(next(iter(per_strategy.values())))
    fig, ax = plt.subplots(figsize=(9, 4.2))
    width = 0.8 / len(per_strategy)
    for i, (strategy, share) in enumerate(per_strategy.items()):
        label = "none (λ = 0 control)" if strategy == CONTROL else strategy
        ax.bar(
            np.arange(bins) + i * width,
            share,
            width,
            color=COLORS.get(strategy, "#7f7f7f"),
            label=label,
        )
    ax.set_xticks(np.arange(bins) + 0.4 - width / 2, _bin_labels(bins), rotation=45)
    ax.set_xlabel("firing density on validation tokens (bin's lower edge)")
    ax.set_ylabel("fraction of latents")
    ax.set_title(f"{sweep.name}: feature density at the final cycle")
    ax.legend(frameon=False, fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, out / "density.png")


def plot_structure(sweep: Sweep, out: Path) -> str | None:
    """Each strategy's structure comparison with its control's SAE per cycle, the mean
    over its trials (cycle 0: the same model, so the same SAE)."""
    rows = sweep.rows[sweep.rows["cycle"].notna() & ~sweep.rows["is_control"]]
    panels = [(m, t) for m, t in STRUCTURE if m in rows and rows[m].notna().any()]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, (metric, title) in zip(axes.flat, panels, strict=True):
        means = rows.groupby(["strategy_effective", "cycle"])[metric].mean().unstack(0)
        for strategy in means:
            ax.plot(
                means.index,
                means[strategy],
                marker="o",
                color=COLORS.get(strategy, "#7f7f7f"),
                label=strategy,
            )
        if metric != OVERLAP:
            ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("cycle")
        ax.set_xticks(sorted(means.index.astype(int)))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out / "structure.png")
