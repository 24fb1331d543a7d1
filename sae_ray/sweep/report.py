"""`sae-ray report SWEEP`: a sweep's answer as pictures, in one offline HTML page.

Reads what the sweep wrote (`results.csv`, `config.yaml`, `best.json`, `optuna.db`) from a
local directory or a bucket and writes `report/index.html` beside them, with the PNGs it
shows: each objective and accuracy (a causal LM: perplexity) per cycle for every trial
(the λ = 0 control drawn apart), the interpretability / accuracy (perplexity) front with
the best trial(s) marked, Optuna's parameter importances per objective, each strategy
against the control, and the trials.
"""

from __future__ import annotations

import html
import io
import json
import logging
import shutil
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters or in CI
import pandas as pd  # noqa: E402
import yaml  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from sae_ray import storage  # noqa: E402
from sae_ray.config import CONTROL, Config, ConfigError, one_line  # noqa: E402
from sae_ray.sweep.comparison import Design, comparison, settings  # noqa: E402
from sae_ray.sweep.dictionary_figures import plot_density, plot_structure  # noqa: E402
from sae_ray.sweep.figures import (  # noqa: E402
    Sweep,
    importances,
    plot_control,
    plot_cycles,
    plot_front,
    plot_importance,
    strategy_of,
    strategy_table,
)
from sae_ray.sweep.results import (  # noqa: E402
    BEST,
    CONFIG,
    RESULTS,
    SEEDS,
    STUDY,
    comparison_rows,
    final_rows,
)

log = logging.getLogger(__name__)
REPORT = "report"


def _read(location: str, name: str, parse):
    """One of the sweep's files, parsed; anything unreadable is one line naming the file."""
    path = storage.join(location, name)
    try:
        return parse(storage.read_bytes(path))
    except (ValueError, TypeError, KeyError, UnicodeDecodeError, yaml.YAMLError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{path}: damaged or not a sweep's {name} ({reason})") from None


def _config(data: bytes) -> Config:
    try:
        return Config.model_validate(yaml.safe_load(data))
    except ValidationError as err:
        raise ValueError(one_line(err)) from None


def _results(data: bytes) -> pd.DataFrame:
    # a trial id is text ("00000123" is no number, nor "1e234567" infinity); the copy
    # holds a block per dtype, not one per column (hundreds: pandas warns on the console)
    rows = pd.read_csv(io.BytesIO(data), dtype={"trial_id": str}).copy()
    missing = {"trial_id", "cycle", "status"} - set(rows.columns)
    if missing:
        raise ValueError(f"no {sorted(missing)[0]} column")
    return rows


def load_sweep(location: str, scratch: Path) -> Sweep:
    """What the report needs from a finished (or partly finished) sweep, local or remote."""
    location = storage.resolve(location)
    for name in (RESULTS, CONFIG):
        if not storage.is_file(storage.join(location, name)):
            raise FileNotFoundError(f"{storage.join(location, name)}: not found (is it a sweep?)")
    cfg = _read(location, CONFIG, _config)
    rows = _read(location, RESULTS, _results)
    best_path = storage.join(location, BEST)
    best = _read(location, BEST, json.loads) if storage.is_file(best_path) else {}
    if not isinstance(best, dict):
        raise ConfigError(f"{best_path}: damaged or not a sweep's {BEST} (not an object)")
    study = None
    if storage.is_file(storage.join(location, STUDY)):
        study = scratch / STUDY
        study.write_bytes(storage.read_bytes(storage.join(location, STUDY)))
    seeds = None
    if storage.is_file(storage.join(location, SEEDS)):
        seeds = _read(location, SEEDS, _results)
    rows["strategy_effective"] = rows.apply(strategy_of, axis=1)
    if "is_control" not in rows:
        rows["is_control"] = rows["strategy_effective"] == CONTROL
    rows["is_control"] = rows["is_control"].fillna(False).astype(bool)
    return Sweep(
        cfg.experiment.name,
        cfg,
        rows,
        best,
        study,
        cfg.search.goals(),
        list(cfg.search.space),
        seeds,
    )


# ------------------------------------------------------------------------------ figures


def trials_table(sweep: Sweep) -> pd.DataFrame:
    final = pd.DataFrame(final_rows(sweep.rows.to_dict("records")))
    primary = sweep.goals[0]
    metrics = [g.key for g in sweep.goals] + sweep.task_metrics + ["sae/fvu", "sae/l0"]
    metrics = list(dict.fromkeys(metrics + (["perplexity_change_pct"] if sweep.cfg.is_lm else [])))
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
.scroll { overflow-x: auto; }
"""


def _html_table(frame: pd.DataFrame) -> str:
    """A sortable table, scrolling sideways where it is wider than the page."""
    table = frame.to_html(
        index=False,
        classes="sortable",
        na_rep="",
        float_format=lambda v: f"{v:.4g}",
        escape=True,
        border=0,
    )
    return f"<div class=scroll>{table}</div>"


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
    try:
        index = _write_pages(location, pages)
        for path in sorted(pages.iterdir(), key=lambda p: p.name == index):  # page last
            storage.upload(path, storage.join(target, path.name))
    except BaseException:
        shutil.rmtree(pages, ignore_errors=True)  # a failed report leaves no scratch behind
        raise
    if remote:
        return storage.join(target, index), pages
    shutil.rmtree(pages)
    return storage.join(target, index), Path(target)


def _write_pages(location: str, pages: Path) -> str:
    """The page and its figures, drawn into `pages`; returns the page's file name."""
    with tempfile.TemporaryDirectory(prefix="sae-ray-report-") as tmp:
        sweep = load_sweep(location, Path(tmp))
        sections = [
            f"<h1>Sweep <code>{html.escape(sweep.name)}</code></h1>",
            f"<p class=note>{_summary_line(sweep)}</p>",
        ]
        if not sweep.cfg.ground_truth:  # one fit per trial: no cycles to follow
            sections += ["<h2>Per cycle</h2>", _img(plot_cycles(sweep, pages))]
        front = plot_front(sweep, pages)
        if front:
            if sweep.cfg.ground_truth:
                heading = "MCC against L0 (the Pareto front of the true features found)"
            else:
                against = "perplexity" if sweep.cfg.is_lm else "accuracy"
                heading = f"Interpretability against {against}"
            sections += [f"<h2>{heading}</h2>", _img(front)]
        if not sweep.cfg.ground_truth:  # a ground-truth sweep has no strategies or control
            sections += _comparison_sections(sweep, pages)
            sections += _dictionary_sections(sweep, pages)
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
    return "index.html"


def _comparison_sections(sweep: Sweep, pages: Path) -> list[str]:
    """Each strategy against the λ = 0 control: comparison.csv's table and figure, the
    unpaired strategy means, and the same per searched setting."""
    sections: list[str] = []
    compared = comparison_table(sweep)
    sections += [
        "<h2>Strategies against the λ = 0 control</h2><p class=note>comparison.csv: each "
        "strategy minus the control of the same seed (and each contrast between "
        "strategies), its points averaged within each seed first, so n counts seeds; "
        "mean, 95 % t-interval, p-value (the primary contrast unadjusted, the rest "
        "Holm-adjusted together), d<sub>z</sub> and the minimum detectable effect at "
        "80 % power. <i>underpowered</i>: the interval cannot rule out an effect of "
        "that size.</p>"
    ]
    control = plot_control(sweep, compared, pages)
    if control:
        sections.append(_img(control))
    else:
        sections.append("<p class=note>No control trial finished: nothing to compare.</p>")
    sections.append(_html_table(compared.round(4)))
    sections += [
        "<p class=note>Each strategy's trials' final-cycle means against the control "
        "trials' (not paired: context for the table above).</p>",
        _html_table(strategy_table(sweep)),
    ]
    if settings(sweep.cfg.search.space):
        sections += [
            "<p class=note>The same within each searched setting (architecture, k, "
            "...; comparison_by_setting.csv, Holm-adjusted over that table).</p>",
            _html_table(comparison_table(sweep, by_setting=True).round(4)),
        ]
    return sections


def _dictionary_sections(sweep: Sweep, pages: Path) -> list[str]:
    """The SAEs' dictionaries: density, and the structure comparison with the control."""
    density, structure = plot_density(sweep, pages), plot_structure(sweep, pages)
    if not (density or structure):
        return []
    out = [
        "<h2>The dictionaries</h2><p class=note>SAEBench's feature density per strategy, "
        "and the seed's structure comparison: each strategy's SAE against the SAE of its "
        "paired λ = 0 model, per cycle (the comparison table above tests the final cycle's "
        "delta/features/... and structure/dict_overlap across seeds).</p>"
    ]
    return out + [_img(name) for name in (density, structure) if name]


def comparison_table(sweep: Sweep, by_setting: bool = False) -> pd.DataFrame:
    """comparison.csv's table (comparison_by_setting.csv's with `by_setting`), from the same
    rows: each trial's seeds at its last cycle."""
    seeds = [] if sweep.seeds is None else sweep.seeds.to_dict("records")
    rows = comparison_rows(sweep.rows.to_dict("records"), seeds)
    return comparison(rows, Design.of(sweep.cfg, by_setting=by_setting))


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
