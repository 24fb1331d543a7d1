"""results.csv (one row per trial x cycle) and the end-of-sweep table.

Columns: trial_id, cycle, every searched parameter by its dotted name, then the metrics
under their stable names, then status and error. A trial that failed keeps the cycles it
finished, plus a row saying why it stopped, so no finished work is lost from the table.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

LEAD = ["trial_id", "cycle"]
TAIL = ["status", "error"]
HEADLINE = ["val/accuracy", "test/accuracy", "interp/u", "sae/fvu", "sae/l0", "sae/dead_pct"]
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


def collect_results(grid, params: list[str]) -> list[dict[str, Any]]:
    rows = []
    for result in grid:
        config = result.config or {}
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
    headline = [metric] + [m for m in HEADLINE if m != metric]
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
