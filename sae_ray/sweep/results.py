"""results.csv (one row per trial x cycle) and the end-of-sweep table.

Columns: trial_id, cycle, every searched parameter by its dotted name, then the metrics
under their stable names, then status and error. A trial that failed keeps the cycles it
finished, plus a row saying why it stopped, so no finished work is lost from the table.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml
from tabulate import tabulate

from sae_ray import storage
from sae_ray.config.metrics import headline as metrics_headline
from sae_ray.sweep.comparison import Design, comparison, settings

if TYPE_CHECKING:
    from sae_ray.config import Config, Objective, SpaceEntry

LEAD = ["trial_id", "cycle"]
TAIL = ["status", "error"]
RESULTS, BEST, STUDY, CONFIG = "results.csv", "best.json", "optuna.db", "config.yaml"
COMPARISON, SEEDS = "comparison.csv", "seeds.csv"
BY_SETTING = "comparison_by_setting.csv"
# Tune's own bookkeeping columns that say nothing about the science.
_TUNE_COLUMNS = {
    "timestamp",
    "checkpoint_dir_name",
    "done",
    "training_iteration",
    "date",
    "time_this_iter_s",
    "time_total_s",
    "pid",
    "hostname",
    "node_ip",
    "time_since_restore",
    "iterations_since_restore",
    "strategy_effective",
}


def _error_line(error: BaseException | None) -> str:
    if error is None:
        return ""
    text = str(error).strip().splitlines()
    return (text[-1] if text else type(error).__name__)[:500]


def _trial_params(result) -> dict[str, Any]:
    """The trial's sampled parameters: Tune's result config or, when that is empty (a trial
    that errored before the sweep was resumed comes back without one), its params.json."""
    if result.config:
        return result.config
    import pyarrow.fs as pafs

    fs = getattr(result, "filesystem", None) or pafs.LocalFileSystem()
    try:
        with fs.open_input_stream(f"{result.path}/params.json") as fh:
            return json.loads(fh.read())
    except (OSError, ValueError):
        return {}


def collect_results(grid, params: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        config = _trial_params(result)
        frame = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        status = "ERROR" if result.error else "COMPLETE"
        records = frame.to_dict("records") if frame is not None and len(frame) else []
        for record in records:
            row = {"trial_id": trial_id, **{p: config.get(p) for p in params}}
            row.update(
                {
                    k: v
                    for k, v in record.items()
                    if k not in _TUNE_COLUMNS and not k.startswith("config/")
                }
            )
            row.update(trial_id=trial_id, status=status, error="")
            rows.append(row)
        if result.error:
            rows.append(
                {
                    "trial_id": trial_id,
                    "cycle": None,
                    **{p: config.get(p) for p in params},
                    "status": "ERROR",
                    "error": _error_line(result.error),
                }
            )
    return rows


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    """Written to a temporary name and renamed: a crash never leaves half a CSV."""
    frame = pd.DataFrame(rows)
    metrics = sorted(c for c in frame.columns if c not in LEAD + TAIL and "/" in c)
    rest = [c for c in frame.columns if c not in LEAD + TAIL + metrics]
    frame = frame[[*LEAD, *rest, *metrics, *[c for c in TAIL if c in frame.columns]]]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    frame.to_csv(tmp, index=False)
    os.replace(tmp, path)


def final_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each trial's last finished cycle (or its error row when it finished none)."""
    last: dict[str, dict[str, Any]] = {}
    for row in rows:
        done = row.get("cycle") is not None and not _isnan(row.get("cycle"))
        current = last.get(row["trial_id"])
        if current is None or (
            done and (current.get("cycle") is None or row["cycle"] >= current["cycle"])
        ):
            last[row["trial_id"]] = row
        if row.get("status") == "ERROR":
            last[row["trial_id"]]["status"] = "ERROR"
    return list(last.values())


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def best_row(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    scored = [
        r
        for r in final_rows(rows)
        if r.get("status") == "COMPLETE"
        and isinstance(r.get(metric), (int, float))
        and not _isnan(r.get(metric))
    ]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r[metric])


def summary_table(rows: list[dict[str, Any]], params: list[str], metric: str) -> str:
    lm = any("val/perplexity" in row for row in rows)
    truth = any("gt/mcc" in row for row in rows)
    headline = [metric] + [m for m in metrics_headline(lm, truth) if m != metric]
    table = []
    for row in final_rows(rows):
        line = {
            "trial": row["trial_id"],
            **{p: row.get(p) for p in params},
            "cycle": row.get("cycle"),
        }
        line.update({m: row.get(m) for m in headline})
        line["status"] = row.get("status")
        table.append(line)
    return tabulate(table, headers="keys", floatfmt=".4g", tablefmt="github")


# ---------------------------------------------------------------- best.json, the study


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _feasible(row: dict[str, Any]) -> bool:
    flag = row.get("feasible", True)
    return bool(flag) if not _isnan(flag) else True


def scored_rows(rows: list[dict[str, Any]], goals: list[Objective]) -> list[dict[str, Any]]:
    """Trials that can be best: completed, feasible, every objective a finite number."""
    return [
        r
        for r in final_rows(rows)
        if r.get("status") == "COMPLETE"
        and _feasible(r)
        and all(_finite(r.get(g.key)) for g in goals)
    ]


def undominated(points: np.ndarray) -> np.ndarray:
    """Indices of the rows of `points` that no other row beats: at least as good in every
    column and better in one, every column maximised. The one Pareto rule (best.json's front
    and the report's)."""
    keep = []
    for i, p in enumerate(points):
        beaten = np.any(np.all(points >= p, axis=1) & np.any(points > p, axis=1))
        if not beaten:
            keep.append(i)
    return np.array(keep, dtype=int)


def pareto_front(rows: list[dict[str, Any]], goals: list[Objective]) -> list[dict[str, Any]]:
    candidates = scored_rows(rows, goals)
    signs = [1.0 if g.mode == "max" else -1.0 for g in goals]
    points = np.array(
        [[s * r[g.key] for s, g in zip(signs, goals, strict=True)] for r in candidates]
    ).reshape(len(candidates), len(goals))
    return [candidates[i] for i in undominated(points)]


def _entry(row: dict[str, Any], params: list[str], goals: list[Objective]) -> dict[str, Any]:
    return {
        "trial_id": row["trial_id"],
        "cycle": row.get("cycle"),
        "params": {p: row.get(p) for p in params if not _isnan(row.get(p))},
        "objectives": {g.key: row[g.key] for g in goals},
        "is_control": bool(row.get("is_control", False)),
    }


def best_summary(rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """The best feasible trial (one objective) or the Pareto front (several), with the
    settings that produced them; infeasible and failed trials are never best."""
    goals = cfg.search.goals()
    params = list(cfg.search.space)
    out: dict[str, Any] = {
        "sweep": cfg.experiment.name,
        "objectives": [g.model_dump() for g in goals],
        "constraints": [c.model_dump(exclude_none=True) for c in cfg.search.constraints],
        "trials": len(final_rows(rows)),
        "feasible": len(scored_rows(rows, goals)),
    }
    if len(goals) > 1:
        front = pareto_front(rows, goals)
        out["pareto_front"] = [_entry(r, params, goals) for r in front]
    else:
        best = best_row(scored_rows(rows, goals), goals[0].key, goals[0].mode)
        out["best"] = _entry(best, params, goals) if best else None
    return out


def _distribution(entry: SpaceEntry):
    import optuna.distributions as d

    if entry.type == "choice":
        return d.CategoricalDistribution(entry.values)
    if entry.type in ("int", "intlog"):
        log = entry.type == "intlog"
        step = 1 if log else entry.step or 1
        return d.IntDistribution(int(entry.low), int(entry.high), log=log, step=step)
    return d.FloatDistribution(entry.low, entry.high, log=entry.type == "loguniform")


def export_study(rows: list[dict[str, Any]], cfg: Config, path: Path) -> None:
    """The sweep as an Optuna study in SQLite, for Optuna's own analysis and plots:
    `optuna.load_study(study_name=<sweep name>, storage="sqlite:///<path>")`."""
    import optuna

    goals = cfg.search.goals()
    space = cfg.search.space
    tmp = path.with_suffix(".db.tmp")
    tmp.unlink(missing_ok=True)
    url = f"sqlite:///{tmp}"
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "a new study created"
    study = optuna.create_study(
        study_name=cfg.experiment.name,
        storage=url,
        directions=["maximize" if g.mode == "max" else "minimize" for g in goals],
    )
    by_trial: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_trial.setdefault(row["trial_id"], []).append(row)
    trials = []
    for final in final_rows(rows):
        params = {p: final.get(p) for p in space if final.get(p) is not None}
        params = {p: v for p, v in params.items() if not _isnan(v)}
        values = [final.get(g.key) for g in goals]
        done = final.get("status") == "COMPLETE" and all(_finite(v) for v in values)
        cycles = [r for r in by_trial[final["trial_id"]] if _finite(r.get("cycle"))]
        trials.append(
            optuna.trial.create_trial(
                params=params,
                distributions={p: _distribution(space[p]) for p in params},
                values=[float(v) for v in values] if done else None,
                state=optuna.trial.TrialState.COMPLETE if done else optuna.trial.TrialState.FAIL,
                user_attrs={
                    "trial_id": final["trial_id"],
                    "feasible": _feasible(final),
                    "constraint": [float(final.get("constraint/violation", 0.0) or 0.0)],
                    "error": final.get("error") or "",
                },
                intermediate_values=(
                    {
                        int(r["cycle"]): float(r[goals[0].key])
                        for r in cycles
                        if _finite(r.get(goals[0].key))
                    }
                    if len(goals) == 1
                    else None
                ),
            )
        )
    study.add_trials(trials)
    os.replace(tmp, path)


def write_config(cfg: Config) -> None:
    """The resolved config beside the results: what `sae-ray report` reads, and a record."""
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    storage.write_bytes(storage.join(cfg.sweep_uri, CONFIG), text.encode())


def write_outputs(rows: list[dict[str, Any]], cfg: Config) -> None:
    """results.csv, best.json and optuna.db in the sweep's storage, each whole or not at all
    (staged on local disk, then renamed into place or PUT as one object)."""
    with tempfile.TemporaryDirectory(prefix="sae-ray-outputs-") as tmp:
        staged = Path(tmp)
        write_results(rows, staged / RESULTS)
        (staged / BEST).write_text(json.dumps(best_summary(rows, cfg), indent=1, default=str))
        if rows:
            export_study(rows, cfg, staged / STUDY)
        seeds = seed_rows(rows, cfg)
        if seeds:
            write_results(seeds, staged / SEEDS)
        compared = comparison_rows(rows, seeds)
        comparison(compared, Design.of(cfg)).to_csv(staged / COMPARISON, index=False)
        if settings(cfg.search.space):
            split = comparison(compared, Design.of(cfg, by_setting=True))
            split.to_csv(staged / BY_SETTING, index=False)
        # config.yaml: written when the sweep starts
        for name in (RESULTS, SEEDS, BEST, STUDY, COMPARISON, BY_SETTING):
            if (staged / name).is_file():
                storage.upload(staged / name, storage.join(cfg.sweep_uri, name))


def seed_rows(rows: list[dict[str, Any]], cfg: Config) -> list[dict[str, Any]]:
    """seeds.csv: each trial x cycle row's per-seed rows (what its workers wrote to
    `cfg.seeds_uri`), with the row's parameters and status."""
    out = []
    for row in rows:
        if not _finite(row.get("cycle")):
            continue
        location = storage.join(cfg.seeds_uri, f"{row['trial_id']}-c{int(row['cycle'])}.json")
        if not storage.is_file(location):
            continue
        shared = {k: v for k, v in row.items() if "/" not in k and k != "n_seeds"}
        out += [{**shared, **seeded} for seeded in json.loads(storage.read_bytes(location))]
    return out


def comparison_rows(
    rows: list[dict[str, Any]], seeds: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """What comparison.csv pairs: every trial's seed rows (each cycle), and the result rows
    of trials that wrote none (a trial that failed before its first cycle is counted as
    stopped)."""
    seeded = {r["trial_id"] for r in seeds}
    return [*seeds, *(r for r in rows if r["trial_id"] not in seeded)]
