"""The report's figures, from a loaded sweep: each objective and accuracy per cycle for
every trial (the λ = 0 control drawn apart), the interpretability / accuracy front with
the best trial(s) marked, Optuna's parameter importances, and each strategy against the
control. Each writes a PNG and returns its file name."""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from sae_ray.config import CONTROL, Config  # noqa: E402
from sae_ray.config.metrics import task_metrics
from sae_ray.sweep.results import final_rows, undominated  # noqa: E402

log = logging.getLogger(__name__)
# One colour per strategy, the same in every figure; the control is black.
COLORS = {
    "none": "#000000",
    "per_class": "#1f77b4",
    "per_class_complement": "#9467bd",
    "per_example": "#ff7f0e",
    "centroid": "#8c564b",
    "shuffled": "#e377c2",
    "random": "#2ca02c",
    "topk_sharp": "#1f77b4",
    "l1": "#ff7f0e",
}
GT_X, GT_Y = "gt/l0", "gt/mcc"  # a ground-truth sweep's front: MCC against L0
ALL_TASK = task_metrics(False) + task_metrics(True) + [GT_X]
LABELS = {
    "val/perplexity": "validation perplexity (lower is better)",
    "test/perplexity": "test perplexity (held out)",
    "sae/ce_loss_score": "CE loss score of the spliced SAE (1 = keeps all)",
    "interp/u": "interp/u (uncertainty coefficient, 0-1)",
    "val/accuracy": "validation accuracy",
    "test/accuracy": "test accuracy (held out)",
    "sae/fvu": "SAE FVU (lower is better)",
    "sae/l0": "SAE L0 (active latents / token)",
    "sae/dead_pct": "dead latents (%)",
    "gt/mcc": "MCC with the true features (1 = all found)",
    "gt/l0": "L0 (active latents per draw, lower is sparser)",
}


@dataclass
class Sweep:
    name: str
    cfg: Config
    rows: pd.DataFrame
    best: dict[str, Any]
    study_path: Path | None
    goals: list = field(default_factory=list)
    params: list[str] = field(default_factory=list)
    seeds: pd.DataFrame | None = None  # seeds.csv: each trial x cycle's rows per seed

    @property
    def task_metrics(self) -> list[str]:
        """Accuracy, or perplexity for a causal LM sweep (validation, then test); a
        ground-truth sweep's trade-off is L0."""
        if self.cfg.ground_truth:
            return [GT_X]
        return task_metrics(self.cfg.is_lm)


def _label(metric: str) -> str:
    return LABELS.get(metric, metric)


def strategy_of(row: pd.Series) -> str:
    value = row.get("strategy_effective")
    if isinstance(value, str):
        return value
    value = row.get("sharpening.strategy")
    return value if isinstance(value, str) else "?"


def plot_cycles(sweep: Sweep, out: Path) -> str:
    """Every trial's objective(s) and accuracy against the cycle; the control in black."""
    metrics = list(dict.fromkeys([g.metric for g in sweep.goals] + sweep.task_metrics))
    metrics = [m for m in metrics if m in sweep.rows]
    done = sweep.rows[sweep.rows["cycle"].notna()]
    cols = min(2, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(6.2 * cols, 3.8 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=False):
        for _, trial in done.groupby("trial_id", sort=False):
            trial = trial.sort_values("cycle")
            strategy = trial["strategy_effective"].iloc[-1]
            control = bool(trial["is_control"].iloc[-1])
            ax.plot(
                trial["cycle"],
                trial[metric],
                marker="s" if control else "o",
                color=COLORS.get(strategy, "#7f7f7f"),
                linewidth=2.8 if control else 1.2,
                linestyle="--" if control else "-",
                alpha=1.0 if control else 0.75,
                zorder=3 if control else 2,
            )
        ax.set_title(_label(metric), fontsize=11)
        ax.set_xlabel("cycle (0 = fine-tuned model before any sharpening)")
        ax.set_xticks(sorted(done["cycle"].unique().astype(int)))
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.axis("off")
    _strategy_legend(fig, done)
    fig.suptitle(f"{sweep.name}: metrics per cycle, one line per trial", fontsize=13)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return save_figure(fig, out / "cycles.png")


def _strategy_legend(fig, rows: pd.DataFrame) -> None:
    from matplotlib.lines import Line2D

    present = [s for s in COLORS if s in set(rows["strategy_effective"])]
    present += sorted(set(rows["strategy_effective"]) - set(COLORS))
    handles = [
        Line2D(
            [0],
            [0],
            color=COLORS.get(s, "#7f7f7f"),
            linestyle="--" if s == CONTROL else "-",
            linewidth=2.8 if s == CONTROL else 1.5,
            marker="s" if s == CONTROL else "o",
            label="none (λ = 0 control)" if s == CONTROL else s,
        )
        for s in present
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=len(handles),
        bbox_to_anchor=(0.5, 0.95),
        frameon=False,
        title="sharpening strategy",
    )


def plot_front(sweep: Sweep, out: Path) -> str | None:
    """Final-cycle interpretability against held-out accuracy (a causal LM: perplexity):
    the trade-off the sweep asks about. The step line joins the trials nothing beats on
    both axes; stars are best.json's."""
    lm, truth = sweep.cfg.is_lm, sweep.cfg.ground_truth
    x_metric = sweep.task_metrics[-1]
    default_y = ("sae/fvu", "min") if lm else (GT_Y, "max") if truth else ("interp/u", "max")
    y_metric = next((g.metric for g in sweep.goals if g.metric not in ALL_TASK), default_y[0])
    y_mode = next((g.mode for g in sweep.goals if g.metric == y_metric), default_y[1])
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    final = final[final["status"] == "COMPLETE"].dropna(subset=[x_metric, y_metric])
    if final.empty or y_metric not in final or x_metric not in final:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    sign = 1.0 if y_mode == "max" else -1.0
    x_sign = -1.0 if lm or truth else 1.0  # perplexity, L0: lower is better
    pts = np.column_stack([x_sign * final[x_metric].to_numpy(), sign * final[y_metric].to_numpy()])
    front = final.iloc[undominated(pts)].sort_values(x_metric)
    if len(front) > 1:
        ax.step(
            front[x_metric],
            front[y_metric],
            where="post",
            color="#999999",
            linewidth=1,
            zorder=1,
            label="front (nothing better on both axes)",
        )
    # a ground-truth sweep has no strategies: its points are told apart by architecture
    by = "sae.architecture" if truth and "sae.architecture" in final else "strategy_effective"
    for i, (strategy, group) in enumerate(final.groupby(by)):
        ax.scatter(
            group[x_metric],
            group[y_metric],
            s=60,
            color=f"C{i}" if by != "strategy_effective" else COLORS.get(strategy, "#7f7f7f"),
            marker="s" if strategy == CONTROL else "o",
            zorder=3,
            label="none (λ = 0 control)" if strategy == CONTROL else strategy,
        )
    best_ids = [e["trial_id"] for e in sweep.best.get("pareto_front", [])]
    if sweep.best.get("best"):
        best_ids.append(sweep.best["best"]["trial_id"])
    best = final[final["trial_id"].isin(best_ids)]
    ax.scatter(
        best[x_metric],
        best[y_metric],
        s=380,
        marker="*",
        facecolors="none",
        edgecolors="#d62728",
        linewidths=1.6,
        zorder=4,
        label="best (best.json)",
    )
    for _, row in best.iterrows():
        ax.annotate(
            str(row["trial_id"]).removeprefix("trial_"),
            (row[x_metric], row[y_metric]),
            textcoords="offset points",
            xytext=(8, 8),
            fontsize=8,
            color="#d62728",
        )
    ax.set_xlabel(f"{_label(x_metric)}, final cycle")
    ax.set_ylabel(f"{_label(y_metric)}, final cycle")
    against = "L0" if truth else "perplexity" if lm else "accuracy"
    ax.set_title(f"{sweep.name}: {'MCC' if truth else 'interpretability'} against {against}")
    ax.margins(x=0.12, y=0.12)  # room for the star labels at the edges
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, out / "front.png")


IMPORTANCE_TRIALS = 20  # fewer, and one trial's noise decides the ranking


def importances(sweep: Sweep) -> dict[str, dict[str, float] | str]:
    """Optuna's fANOVA importances per objective on the exported study, or why there are none."""
    if sweep.study_path is None:
        return {g.key: "no optuna.db" for g in sweep.goals}
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=sweep.name, storage=f"sqlite:///{sweep.study_path}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    out: dict[str, dict[str, float] | str] = {}
    for i, goal in enumerate(sweep.goals):
        if len(complete) < IMPORTANCE_TRIALS:
            out[goal.key] = (
                f"needs {IMPORTANCE_TRIALS} completed trials, has {len(complete)}: fANOVA's "
                "forest on a handful of trials ranks noise"
            )
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[goal.key] = optuna.importance.get_param_importances(
                    study,
                    target=lambda t, i=i: t.values[i],
                    evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                )
        except (RuntimeError, ValueError) as err:
            out[goal.key] = str(err).splitlines()[0]
    return out


def plot_importance(metric: str, values: dict[str, float], out: Path, index: int) -> str:
    names = list(values)[::-1]
    fig, ax = plt.subplots(figsize=(6.5, 0.55 * len(names) + 1.6))
    ax.barh(names, [values[n] for n in names], color="#1f77b4")
    for y, name in enumerate(names):
        ax.text(values[name], y, f" {values[name]:.2f}", va="center", fontsize=9)
    ax.set_xlim(0, max(1.0, max(values.values()) * 1.15))
    ax.set_xlabel("importance (fANOVA share of variance, sums to 1)")
    ax.set_title(f"What drives {metric}")
    fig.tight_layout()
    return save_figure(fig, out / f"importance_{index}.png")


def strategy_table(sweep: Sweep) -> pd.DataFrame:
    """Each strategy's final-cycle means against the control's (mean over control trials)."""
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    final = final[final["status"] == "COMPLETE"]
    metrics = list(dict.fromkeys([g.metric for g in sweep.goals] + sweep.task_metrics))
    metrics = [m for m in metrics if m in final]
    control = final[final["is_control"]]
    lines = []
    for strategy, group in final.groupby("strategy_effective"):
        line: dict[str, Any] = {"strategy": strategy, "trials": len(group)}
        for m in metrics:
            line[m] = group[m].mean()
            if not control.empty and strategy != CONTROL:
                line[f"Δ {m} vs control"] = group[m].mean() - control[m].mean()
        lines.append(line)
    table = pd.DataFrame(lines)
    order = {s: i for i, s in enumerate(COLORS)}
    return table.sort_values("strategy", key=lambda s: s.map(lambda v: order.get(v, 99)))


def plot_control(sweep: Sweep, table: pd.DataFrame, out: Path) -> str | None:
    """comparison.csv's paired differences at the compared cycle, with their intervals:
    one panel per metric (the primary's first, then the objectives' and the task's), one
    bar per strategy against the control and per contrast, with its n seeds."""
    from sae_ray.config.metrics import PAIRED

    rows = table[table["n"] > 0] if not table.empty else table
    if rows.empty:
        return None
    wanted = [m for m in table.loc[table["primary"].astype(bool), "metric"]]
    wanted += [g.metric for g in sweep.goals] + sweep.task_metrics
    metrics = [m for m in dict.fromkeys(wanted) if m in PAIRED and m in set(rows["metric"])]
    metrics = metrics or list(dict.fromkeys(rows["metric"]))[:3]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes.flat, metrics, strict=True):
        part = rows[rows["metric"] == metric]
        names = [
            f"{s}{'' if a == CONTROL else f' − {a}'}\nn={n}"
            for s, a, n in zip(part["strategy"], part["against"], part["n"], strict=True)
        ]
        mean = part["mean"].to_numpy(dtype=float)
        low = np.nan_to_num(mean - part["ci_low"].to_numpy(dtype=float))
        high = np.nan_to_num(part["ci_high"].to_numpy(dtype=float) - mean)
        colors = [COLORS.get(str(s).split("(")[0], "#7f7f7f") for s in part["strategy"]]
        bars = ax.bar(names, mean, yerr=[low, high], capsize=4, color=colors, alpha=0.85)
        for bar, against in zip(bars, part["against"], strict=True):
            bar.set_hatch("" if against == CONTROL else "//")
        ax.axhline(0, color="black", linewidth=1)
        primary = part["primary"].astype(bool).any()
        ax.set_title(f"{metric}{' (primary)' if primary else ''}", fontsize=10)
        ax.set_ylabel(f"paired difference, cycle {int(part['cycle'].max())}")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(
        f"{sweep.name}: paired differences by seed, 95 % intervals (hatched: between strategies)"
    )
    fig.tight_layout()
    return save_figure(fig, out / "control.png")


def save_figure(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------------- page


def plot_intervention(rows: list[dict[str, Any]], out: Path, title: str) -> str:
    """Perplexity against `k_sharp`, one line per SAE; its full reconstruction as a
    marker at k, the clean model as a dashed line."""
    frame = pd.DataFrame(rows)
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (key, curve) in enumerate(frame.groupby("sae", sort=False)):
        color = plt.cm.tab10(i % 10)
        sharp = curve[curve["kind"] == "sharpened"].sort_values("k_sharp")
        label = f"{curve['model_strategy'].iloc[0]} (k={curve['k'].iloc[0]}, {key[:6]})"
        ax.plot(sharp["k_sharp"], sharp["perplexity"], marker="o", color=color, label=label)
        full = curve[curve["kind"] == "reconstruction"]
        ax.scatter(full["k_sharp"], full["perplexity"], marker="D", s=60, color=color)
        clean = curve[curve["kind"] == "clean"]["perplexity"].iloc[0]
        ax.axhline(clean, linestyle="--", linewidth=1, color=color, alpha=0.6)
    ax.set_xlabel("k_sharp (latents kept per token; diamond: the full reconstruction)")
    ax.set_ylabel("validation perplexity (dashed: the clean model)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save_figure(fig, out)
