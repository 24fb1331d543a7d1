"""comparison.csv: every strategy against the λ = 0 control, as paired differences with
intervals, so that "X beats the control" is a claim with its uncertainty, not two means.

A strategy's trial is paired with the control of the same experiment seed at its last
cycle (a trial's own `delta/<metric>`, when it reports one, is that difference already).
A point run more than once at one seed is one experiment, not several: an adaptive search
re-suggests points of a discrete space, and with shared artifacts the rerun finds every
stage and reports the same numbers. Its runs count once (their mean), or the intervals
would narrow on copies.
For each strategy and metric: n pairs, the mean difference, its 95 % t-interval and
p-value (scipy's one-sample t-test of the differences), Cohen's d_z (mean / sd of the
differences), and the p-value Holm-adjusted over every comparison in the file."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pandas as pd

from sae_ray.config import SpaceEntry
from sae_ray.config.metrics import PAIRED as COMPARED

SEEDS = ("seed", "experiment.seed")  # a seeds.csv row's own, or a trial's sampled one
COLUMNS = ["strategy", "metric", "n", "mean", "ci_low", "ci_high", "p", "effect_size", "p_holm"]
DIFF_COLUMNS = ["strategy", "seed", "trial_id", "metric", "diff"]
STRATEGY = "sharpening.strategy"  # the searched key every comparison is about


def paired_differences(
    final: list[dict[str, Any]], seed: int, params: list[str] | None = None
) -> pd.DataFrame:
    """One row per (strategy point, seed, metric): its difference to the control of its
    seed (`seed`: the sweep's, for trials that did not sample one), with the point's
    `params` values. `final`: each trial's last cycle (`results.final_rows`), or its seeds'
    rows; `params`: the searched keys that name a point (None: every trial is a point of
    its own)."""
    keys = params or []
    done = [r for r in final if r.get("status") == "COMPLETE"]
    if not done:
        return pd.DataFrame(columns=[*DIFF_COLUMNS, *keys])
    frame = pd.DataFrame(done)
    column = next((c for c in SEEDS if c in frame), None)
    frame["seed"] = frame[column].fillna(seed) if column else seed
    is_control = frame.get("is_control", pd.Series(False, index=frame.index)).astype(bool)
    metrics = [m for m in COMPARED if m in frame or f"delta/{m}" in frame]
    controls = frame[is_control].groupby("seed")[[m for m in metrics if m in frame]].mean()
    out = []
    for _, row in frame[~is_control].iterrows():
        point = row["trial_id"] if params is None else _point(row, params)
        key = (row.get("strategy_effective"), row["seed"], point)
        for metric in metrics:
            if f"delta/{metric}" in row and _finite(row[f"delta/{metric}"]):
                diff = row[f"delta/{metric}"]
            elif row["seed"] in controls.index and metric in controls:
                diff = row[metric] - controls.loc[row["seed"], metric]
            else:
                continue
            out.append((*key, metric, diff, row["trial_id"], *(row.get(p) for p in keys)))
    columns = ["strategy", "seed", "point", "metric", "diff", "trial_id", *keys]
    once = pd.DataFrame(out, columns=columns).groupby(
        ["strategy", "seed", "point", "metric"], sort=False, as_index=False, dropna=False
    )
    first = {k: (k, "first") for k in ["trial_id", *keys]}
    return once.agg(diff=("diff", "mean"), **first)[[*DIFF_COLUMNS, *keys]]


def _point(row: pd.Series, params: list[str]) -> str:
    """A point's name: its searched values (NaN for a conditional key it does not set)."""
    return json.dumps([row.get(p) for p in params], default=str)


def summarize(diffs: np.ndarray) -> dict[str, float]:
    """n, mean, 95 % t-interval, p-value and d_z of paired differences (NaN below n = 2)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    out = {"n": len(d), "mean": float(d.mean()) if len(d) else math.nan}
    out.update(ci_low=math.nan, ci_high=math.nan, p=math.nan, effect_size=math.nan)
    if len(d) >= 2 and d.std(ddof=1) > 0:
        test = stats.ttest_1samp(d, 0.0)
        interval = test.confidence_interval(0.95)
        out.update(ci_low=float(interval.low), ci_high=float(interval.high))
        out.update(p=float(test.pvalue), effect_size=float(d.mean() / d.std(ddof=1)))
    return out


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment (family-wise error) of the finite p-values in `p`."""
    p = np.asarray(p, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    finite = np.flatnonzero(np.isfinite(p))
    order = finite[np.argsort(p[finite], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def comparison(
    final: list[dict[str, Any]], seed: int, params: list[str] | None = None
) -> pd.DataFrame:
    """The comparison table (COLUMNS), one row per (strategy, metric), of each trial's last
    cycle (`final`); `params` name a point (`paired_differences`)."""
    return _table(paired_differences(final, seed, params), ["strategy", "metric"])


def settings(space: dict[str, SpaceEntry]) -> list[str]:
    """The searched keys a strategy's gain may depend on and that take a few values (SAE
    architecture, k, expansion, layer...): the choices besides the strategy."""
    return [k for k, entry in space.items() if entry.type == "choice" and k != STRATEGY]


def comparison_by_setting(
    final: list[dict[str, Any]], seed: int, params: list[str], by: list[str]
) -> pd.DataFrame:
    """comparison.csv within each combination of the `by` keys' values (`settings`): at
    which architecture, k or expansion a strategy beats the control. Holm-adjusted over
    this table, a family of its own."""
    return _table(paired_differences(final, seed, params), [*by, "strategy", "metric"])


def _table(diffs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    table = [
        {**dict(zip(keys, group, strict=True)), **summarize(rows["diff"].to_numpy())}
        for group, rows in diffs.groupby(keys, sort=True, dropna=False)
    ]
    frame = pd.DataFrame(table, columns=[*keys, *COLUMNS[2:-1]])
    frame["p_holm"] = holm(frame["p"].to_numpy()) if len(frame) else []
    return frame


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
