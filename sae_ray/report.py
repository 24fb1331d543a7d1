"""`sae-ray report SWEEP`: a sweep's answer as pictures, in one offline HTML page.

Reads what the sweep wrote (`results.csv`, `config.yaml`, `best.json`, `optuna.db`) from a
local directory or a bucket and writes `report/index.html` beside them, with the PNGs it
shows: each objective and accuracy per cycle for every trial (the λ = 0 control drawn
apart), the interpretability / accuracy front with the best trial(s) marked, Optuna's
parameter importances per objective, each strategy against the control, and the trials.
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from sae_ray import storage  # noqa: E402
from sae_ray.config import Config  # noqa: E402
from sae_ray.results import BEST, CONFIG, RESULTS, STUDY, final_rows  # noqa: E402

log = logging.getLogger(__name__)
REPORT = "report"
# One colour per strategy, the same in every figure; the control is black.
COLORS = {"none": "#000000", "per_class": "#1f77b4", "per_example": "#ff7f0e", "random": "#2ca02c"}
ACCURACY = ["val/accuracy", "test/accuracy"]
LABELS = {
    "interp/u": "interp/u (uncertainty coefficient, 0-1)",
    "val/accuracy": "validation accuracy",
    "test/accuracy": "test accuracy (held out)",
    "sae/fvu": "SAE FVU (lower is better)",
    "sae/l0": "SAE L0 (active latents / token)",
    "sae/dead_pct": "dead latents (%)",
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


def _label(metric: str) -> str:
    return LABELS.get(metric, metric)


def _strategy(row: pd.Series) -> str:
    value = row.get("strategy_effective")
    if isinstance(value, str):
        return value
    value = row.get("sharpening.strategy")
    return value if isinstance(value, str) else "?"


def load_sweep(location: str, scratch: Path) -> Sweep:
    """What the report needs from a finished (or partly finished) sweep, local or remote."""
    location = storage.resolve(location)
    for name in (RESULTS, CONFIG):
        if not storage.is_file(storage.join(location, name)):
            raise FileNotFoundError(f"{storage.join(location, name)}: not found (is it a sweep?)")
    cfg = Config.model_validate(yaml.safe_load(storage.read_bytes(storage.join(location, CONFIG))))
    rows = pd.read_csv(io.BytesIO(storage.read_bytes(storage.join(location, RESULTS))))
    best_path = storage.join(location, BEST)
    best = json.loads(storage.read_bytes(best_path)) if storage.is_file(best_path) else {}
    study = None
    if storage.is_file(storage.join(location, STUDY)):
        study = scratch / STUDY
        study.write_bytes(storage.read_bytes(storage.join(location, STUDY)))
    rows["strategy_effective"] = rows.apply(_strategy, axis=1)
    if "is_control" not in rows:
        rows["is_control"] = rows["strategy_effective"] == "none"
    rows["is_control"] = rows["is_control"].fillna(False).astype(bool)
    return Sweep(
        cfg.experiment.name,
        cfg,
        rows,
        best,
        study,
        cfg.search.goals(),
        list(cfg.search.space),
    )


# ------------------------------------------------------------------------------ figures


def plot_cycles(sweep: Sweep, out: Path) -> str:
    """Every trial's objective(s) and accuracy against the cycle; the control in black."""
    metrics = list(dict.fromkeys([g.metric for g in sweep.goals] + ACCURACY))
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
    return _save(fig, out / "cycles.png")


def _strategy_legend(fig, rows: pd.DataFrame) -> None:
    from matplotlib.lines import Line2D

    present = [s for s in COLORS if s in set(rows["strategy_effective"])]
    present += sorted(set(rows["strategy_effective"]) - set(COLORS))
    handles = [
        Line2D(
            [0],
            [0],
            color=COLORS.get(s, "#7f7f7f"),
            linestyle="--" if s == "none" else "-",
            linewidth=2.8 if s == "none" else 1.5,
            marker="s" if s == "none" else "o",
            label="none (λ = 0 control)" if s == "none" else s,
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


def _front(points: np.ndarray) -> np.ndarray:
    """Indices of points no other point beats on both axes (both maximised)."""
    keep = []
    for i, p in enumerate(points):
        beaten = np.any(np.all(points >= p, axis=1) & np.any(points > p, axis=1))
        if not beaten:
            keep.append(i)
    return np.array(keep, dtype=int)


def plot_front(sweep: Sweep, out: Path) -> str | None:
    """Final-cycle interpretability against held-out accuracy: the trade-off the sweep asks
    about. The step line joins the trials nothing beats on both axes; stars are best.json's."""
    y_metric = next((g.metric for g in sweep.goals if "accuracy" not in g.metric), "interp/u")
    y_mode = next((g.mode for g in sweep.goals if g.metric == y_metric), "max")
    x_metric = "test/accuracy"
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    final = final[final["status"] == "COMPLETE"].dropna(subset=[x_metric, y_metric])
    if final.empty or y_metric not in final or x_metric not in final:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    sign = 1.0 if y_mode == "max" else -1.0
    pts = np.column_stack([final[x_metric].to_numpy(), sign * final[y_metric].to_numpy()])
    front = final.iloc[_front(pts)].sort_values(x_metric)
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
    for strategy, group in final.groupby("strategy_effective"):
        ax.scatter(
            group[x_metric],
            group[y_metric],
            s=60,
            color=COLORS.get(strategy, "#7f7f7f"),
            marker="s" if strategy == "none" else "o",
            zorder=3,
            label="none (λ = 0 control)" if strategy == "none" else strategy,
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
    ax.set_title(f"{sweep.name}: interpretability against accuracy")
    ax.margins(x=0.12, y=0.12)  # room for the star labels at the edges
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out / "front.png")


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
        if len(complete) < 2:
            out[goal.key] = f"needs 2 completed trials, has {len(complete)}"
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
    return _save(fig, out / f"importance_{index}.png")


def strategy_table(sweep: Sweep) -> pd.DataFrame:
    """Each strategy's final-cycle means against the control's (mean over control trials)."""
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    final = final[final["status"] == "COMPLETE"]
    metrics = list(dict.fromkeys([g.metric for g in sweep.goals] + ACCURACY))
    metrics = [m for m in metrics if m in final]
    control = final[final["is_control"]]
    lines = []
    for strategy, group in final.groupby("strategy_effective"):
        line: dict[str, Any] = {"strategy": strategy, "trials": len(group)}
        for m in metrics:
            line[m] = group[m].mean()
            if not control.empty and strategy != "none":
                line[f"Δ {m} vs control"] = group[m].mean() - control[m].mean()
        lines.append(line)
    table = pd.DataFrame(lines)
    order = {s: i for i, s in enumerate(COLORS)}
    return table.sort_values("strategy", key=lambda s: s.map(lambda v: order.get(v, 99)))


def plot_control(sweep: Sweep, table: pd.DataFrame, out: Path) -> str | None:
    deltas = [c for c in table.columns if c.startswith("Δ ")]
    rows = table[table["strategy"] != "none"]
    if not deltas or rows.empty:
        return None
    fig, axes = plt.subplots(1, len(deltas), figsize=(4.2 * len(deltas), 3.8), squeeze=False)
    for ax, col in zip(axes.flat, deltas, strict=True):
        values = rows[col].to_numpy(dtype=float)
        ax.bar(rows["strategy"], values, color=[COLORS.get(s, "#7f7f7f") for s in rows["strategy"]])
        ax.axhline(0, color="black", linewidth=1)
        ax.set_title(col.removeprefix("Δ ").removesuffix(" vs control"), fontsize=10)
        ax.set_ylabel("final cycle, strategy − control")
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{sweep.name}: each strategy against the λ = 0 control (same compute)")
    fig.tight_layout()
    return _save(fig, out / "control.png")


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


# --------------------------------------------------------------------------------- page


def trials_table(sweep: Sweep) -> pd.DataFrame:
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    primary = sweep.goals[0]
    metrics = list(dict.fromkeys([g.key for g in sweep.goals] + ACCURACY + ["sae/fvu", "sae/l0"]))
    cols = ["trial_id", *sweep.params, "strategy_effective", "cycle"]
    cols += [m for m in metrics if m in final] + ["status", "error"]
    table = final[[c for c in cols if c in final]].copy()
    if primary.key in table:
        table = table.sort_values(primary.key, ascending=primary.mode == "min", na_position="last")
    return table


SORT_JS = """
document.querySelectorAll('table.sortable th').forEach((th, col) =>
 th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const asc = th.dataset.asc !== 'true'; th.dataset.asc = asc;
  const key = r => { const t = r.cells[col].innerText; const n = parseFloat(t);
                     return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => (key(a) > key(b) ? 1 : key(a) < key(b) ? -1 : 0) * (asc ? 1 : -1))
    .forEach(r => body.appendChild(r));
}));
"""
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
table { border-collapse: collapse; font-size: 13px; margin: .5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
th { background: #f3f3f3; cursor: pointer; } td:first-child, th:first-child { text-align: left; }
.note { color: #666; font-size: 14px; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    return frame.to_html(
        index=False,
        classes="sortable",
        na_rep="",
        float_format=lambda v: f"{v:.4g}",
        escape=True,
        border=0,
    )


def build_report(location: str, out: str | None = None) -> tuple[str, Path]:
    """Write the report for the sweep at `location` (to `out`, default `<sweep>/report`).

    Returns where index.html is and a local directory holding the page and its figures
    (the report itself when local; a copy when it went to a bucket)."""
    location = storage.resolve(location)
    target = storage.resolve(out) if out else storage.join(location, REPORT)
    remote = storage.is_remote(target)
    # Drawn in scratch, then each file put in place whole (renamed locally, one PUT in a
    # bucket): a crash mid-report never leaves a half-written figure under its name.
    pages = Path(tempfile.mkdtemp(prefix="sae-ray-report-"))
    with tempfile.TemporaryDirectory(prefix="sae-ray-report-") as tmp:
        sweep = load_sweep(location, Path(tmp))
        sections = [
            f"<h1>Sweep <code>{html.escape(sweep.name)}</code></h1>",
            f"<p class=note>{_summary_line(sweep)}</p>",
        ]
        sections += ["<h2>Per cycle</h2>", _img(plot_cycles(sweep, pages))]
        front = plot_front(sweep, pages)
        if front:
            sections += ["<h2>Interpretability against accuracy</h2>", _img(front)]
        table = strategy_table(sweep)
        sections += ["<h2>Strategies against the λ = 0 control</h2>"]
        control = plot_control(sweep, table, pages)
        if control:
            sections.append(_img(control))
        else:
            sections.append("<p class=note>No control trial finished: nothing to compare.</p>")
        sections.append(_html_table(table))
        sections.append("<h2>Parameter importance</h2>")
        for i, (metric, values) in enumerate(importances(sweep).items()):
            if isinstance(values, dict) and values:
                sections.append(_img(plot_importance(metric, values, pages, i)))
            else:
                sections.append(
                    f"<p class=note>{html.escape(metric)}: no importances "
                    f"({html.escape(str(values) or 'no varied parameter')}).</p>"
                )
        sections += [
            "<h2>Trials</h2><p class=note>Final cycle of each trial; click a column to sort.</p>",
            _html_table(trials_table(sweep)),
        ]
        page = (
            "<!doctype html><html><head><meta charset=utf-8>"
            f"<title>{html.escape(sweep.name)} report</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}<script>{SORT_JS}</script></body></html>"
        )
        (pages / "index.html").write_text(page)
    for path in sorted(pages.iterdir(), key=lambda p: p.name == "index.html"):  # page last
        storage.upload(path, storage.join(target, path.name))
    if remote:
        return storage.join(target, "index.html"), pages
    shutil.rmtree(pages)
    return storage.join(target, "index.html"), Path(target)


def _img(name: str) -> str:
    return f'<img src="{html.escape(name)}" alt="{html.escape(name)}">'


def _summary_line(sweep: Sweep) -> str:
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    counts = final["status"].value_counts().to_dict()
    goals = ", ".join(f"{g.key} ({g.mode})" for g in sweep.goals)
    parts = [
        f"{len(final)} trials ({', '.join(f'{n} {s.lower()}' for s, n in counts.items())})",
        f"{sweep.cfg.cycles.count} cycles",
        f"objective{'s' if len(sweep.goals) > 1 else ''}: {goals}",
    ]
    best = sweep.best.get("best")
    if best:
        scores = ", ".join(f"{k} = {v:.4g}" for k, v in best["objectives"].items())
        parts.append(f"best: {best['trial_id']} ({scores})")
    elif sweep.best.get("pareto_front"):
        parts.append(f"Pareto front: {len(sweep.best['pareto_front'])} trials")
    return html.escape("; ".join(parts))
