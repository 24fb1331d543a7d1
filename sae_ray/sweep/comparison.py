"""comparison.csv: every strategy against the λ = 0 control, and the declared contrasts
between strategies, as paired differences whose unit is the seed.

A trial's difference at a seed is its own `delta/<metric>` (its model against the λ = 0
model of that seed and cycle, through an SAE of the trial's settings), or its value minus
the control trial's at that seed. Points of one strategy at one seed are not independent:
they share the seed's cycle-0 model and its control chain, and an adaptive searcher
oversamples the good ones. So a strategy's points are averaged within each seed first (a
point run twice at a seed counts once, the mean of its runs), and the test runs over
seeds: n is the number of seeds, `n_points` how many points each seed averaged. One seed
gives a difference and no interval.

Only trials that reached the compared cycle (the sweep's last, or the primary contrast's)
are compared: a trial stopped early (ASHA) or failed has no difference there, and is
counted in `n_stopped` rather than read as no effect.

Per row: the mean difference, its 95 % t-interval and p-value (scipy's one-sample t-test
of the per-seed differences), Cohen's d_z, the minimum detectable effect at the row's n
(`mde`: the difference a two-sided paired t-test finds with `analysis.power`, statsmodels'
power solved for d_z, times the differences' spread), and a plain reading. The primary
contrast (`analysis.primary`) is reported unadjusted; every other row is Holm-adjusted as
one family.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from sae_ray.config.metrics import PAIRED as COMPARED
from sae_ray.config.strategies import CONTROL

if TYPE_CHECKING:
    from sae_ray.config import Config, SpaceEntry
    from sae_ray.config.analysis import Contrast, Primary

SEEDS = ("seed", "experiment.seed")  # a seeds.csv row's own, or a trial's sampled one
STRATEGY = "sharpening.strategy"  # the searched key every comparison is about
STATS = ["n", "n_points", "n_stopped", "mean", "ci_low", "ci_high", "p", "p_holm"]
STATS += ["effect_size", "mde", "primary", "reading"]
COLUMNS = ["strategy", "against", "metric", "cycle", *STATS]
DIFF_COLUMNS = ["strategy", "seed", "point", "trial_id", "metric", "diff"]


@dataclass
class Design:
    """What a comparison needs to know of the sweep: the seed of trials that sampled none,
    the compared cycle, the searched keys that name a point, and the declared contrasts."""

    seed: int = 0
    last: int = 1  # the sweep's final cycle
    params: list[str] | None = None  # None: every trial is a point of its own
    primary: Primary | None = None
    contrasts: list[Contrast] | None = None  # None: the defaults for what ran
    shuffle_base: str = "per_class"
    alpha: float = 0.05
    power: float = 0.8
    by: list[str] = field(default_factory=list)  # comparison_by_setting's keys

    @classmethod
    def of(cls, cfg: Config, by_setting: bool = False) -> Design:
        analysis = cfg.analysis
        return cls(
            seed=cfg.experiment.seed,
            last=cfg.cycles.count - 1,
            params=list(cfg.search.space),
            primary=analysis.primary,
            contrasts=analysis.contrasts,
            shuffle_base=cfg.shuffle_base,
            alpha=analysis.alpha,
            power=analysis.power,
            by=settings(cfg.search.space) if by_setting else [],
        )

    def cycle_of(self, primary: Primary) -> int:
        return self.last if primary.cycle == "last" else int(primary.cycle)

    def label(self, strategy: str) -> str:
        """A strategy as the table names it: `shuffled` says whose targets it permutes."""
        return f"shuffled({self.shuffle_base})" if strategy == "shuffled" else strategy


def settings(space: dict[str, SpaceEntry]) -> list[str]:
    """The searched keys a strategy's gain may depend on and that take a few values (SAE
    architecture, k, expansion, layer...): the choices besides the strategy."""
    return [k for k, entry in space.items() if entry.type == "choice" and k != STRATEGY]


def _frame(rows: list[dict[str, Any]], design: Design) -> pd.DataFrame:
    """Rows with their seed (the sweep's for trials that sampled none) and strategy."""
    frame = pd.DataFrame(rows)
    if frame.empty or "trial_id" not in frame:
        return pd.DataFrame(columns=["trial_id", "cycle", "status", "seed", "strategy"])
    column = next((c for c in SEEDS if c in frame), None)
    frame["seed"] = frame[column].fillna(design.seed) if column else design.seed
    empty = pd.Series(None, index=frame.index, dtype=object)
    strategy = frame.get("strategy_effective", empty).astype(object)
    frame["strategy"] = strategy.where(strategy.notna(), frame.get(STRATEGY, empty))
    is_control = frame.get("is_control", pd.Series(False, index=frame.index))
    frame["is_control"] = is_control.fillna(False).astype(bool)
    frame.loc[frame["is_control"], "strategy"] = CONTROL
    return frame


def paired_differences(rows: list[dict[str, Any]], design: Design, cycle: int) -> pd.DataFrame:
    """One row per (strategy point, seed, metric) at `cycle`: its difference to the control
    of its seed, a point run more than once at a seed counted once (the mean of its runs),
    with the point's `design.params` values. `rows`: seeds.csv's rows (or results.csv's,
    for trials that wrote none), any cycles."""
    keys = design.params or []
    frame = _frame(rows, design)
    done = frame[(frame["status"] == "COMPLETE") & (frame["cycle"] == cycle)]
    if done.empty:
        return pd.DataFrame(columns=[*DIFF_COLUMNS, *keys])
    metrics = [m for m in COMPARED if m in done or f"delta/{m}" in done]
    controls = done[done["is_control"]].groupby("seed")[[m for m in metrics if m in done]].mean()
    out = []
    for _, row in done[~done["is_control"]].iterrows():
        point = row["trial_id"] if design.params is None else _point(row, keys)
        for metric in metrics:
            if f"delta/{metric}" in row and _finite(row[f"delta/{metric}"]):
                diff = row[f"delta/{metric}"]
            elif row["seed"] in controls.index and metric in controls:
                diff = row[metric] - controls.loc[row["seed"], metric]
            else:
                continue
            if not _finite(diff):  # a column another row has: nothing measured here
                continue
            out.append(
                (row["strategy"], row["seed"], point, row["trial_id"], metric, diff)
                + tuple(row.get(p) for p in keys)
            )
    once = pd.DataFrame(out, columns=[*DIFF_COLUMNS, *keys]).groupby(
        ["strategy", "seed", "point", "metric"], sort=False, as_index=False, dropna=False
    )
    first = {k: (k, "first") for k in ["trial_id", *keys]}
    return once.agg(diff=("diff", "mean"), **first)[[*DIFF_COLUMNS, *keys]]


def _point(row: pd.Series, params: list[str]) -> str:
    """A point's name: its searched values (NaN for a conditional key it does not set)."""
    return json.dumps([row.get(p) for p in params], default=str)


def per_seed(diffs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The unit of replication: each strategy's points averaged within each seed (and
    setting), with how many points each seed averaged."""
    keys = [*by, "strategy", "seed", "metric"]
    if diffs.empty:
        return pd.DataFrame(columns=[*keys, "diff", "points"])
    grouped = diffs.groupby(keys, sort=True, as_index=False, dropna=False)
    return grouped.agg(diff=("diff", "mean"), points=("point", "nunique"))


def summarize(diffs: np.ndarray, alpha: float = 0.05, power: float = 0.8) -> dict[str, float]:
    """n, mean, (1 − alpha) t-interval, p-value, d_z and the minimum detectable effect of
    per-seed differences (NaN below n = 2, or when the differences do not vary)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    out = {"n": len(d), "mean": float(d.mean()) if len(d) else math.nan}
    out.update(ci_low=math.nan, ci_high=math.nan, p=math.nan, effect_size=math.nan)
    out["mde"] = math.nan
    if len(d) >= 2 and d.std(ddof=1) > 0:
        test = stats.ttest_1samp(d, 0.0)
        interval = test.confidence_interval(1 - alpha)
        out.update(ci_low=float(interval.low), ci_high=float(interval.high))
        out.update(p=float(test.pvalue), effect_size=float(d.mean() / d.std(ddof=1)))
        out["mde"] = detectable_dz(len(d), alpha, power) * float(d.std(ddof=1))
    return out


def detectable_dz(n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The standardised effect d_z a two-sided paired t-test over n seeds detects with
    `power` (statsmodels' power of the one-sample t-test, solved for the effect)."""
    from statsmodels.stats.power import TTestPower

    if n < 2:
        return math.nan
    try:
        return float(TTestPower().solve_power(nobs=n, alpha=alpha, power=power))
    except (ValueError, RuntimeError):  # no effect reaches that power at this n
        return math.nan


def seeds_needed(effect_size: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Seeds a paired t-test needs to detect a standardised effect d_z with `power`."""
    from statsmodels.stats.power import TTestPower

    n = TTestPower().solve_power(effect_size=effect_size, alpha=alpha, power=power)
    return max(2, math.ceil(float(n)))


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


def comparison(rows: list[dict[str, Any]], design: Design) -> pd.DataFrame:
    """The comparison table (COLUMNS): each strategy against the control and each contrast
    between strategies, per metric, at the final cycle, plus the primary contrast at its
    cycle; Holm over every row but the primary. With `design.by` (comparison_by_setting.csv)
    the same within each combination of those keys' values (`settings`: at which
    architecture, k or expansion a strategy beats the control), its own family for Holm."""
    by = design.by
    cycles = [design.last]
    if design.primary is not None and design.cycle_of(design.primary) != design.last:
        cycles.append(design.cycle_of(design.primary))
    lines = []
    for cycle in cycles:
        seeds = per_seed(paired_differences(rows, design, cycle), by)
        stopped = _stopped(rows, design, cycle)
        pairs = [(s, CONTROL) for s in sorted(seeds["strategy"].dropna().unique())]
        pairs += _contrasts(design, set(seeds["strategy"].dropna()))
        for strategy, against in dict.fromkeys(pairs):
            for group, values in _sides(seeds, strategy, against, by):
                setting = dict(zip(by, group[:-1], strict=True))
                metric = group[-1]
                if cycle != design.last and not _is_primary(design, strategy, against, metric):
                    continue
                count = sum(stopped.get((*group[:-1], s), 0) for s in {strategy, against})
                lines.append(
                    {
                        **setting,
                        "strategy": design.label(strategy),
                        "against": design.label(against),
                        "metric": metric,
                        "cycle": cycle,
                        **summarize(values["diff"].to_numpy(), design.alpha, design.power),
                        "n_points": float(values["points"].mean()) if len(values) else 0.0,
                        "n_stopped": count,
                        "primary": cycle == _primary_cycle(design)
                        and _is_primary(design, strategy, against, metric),
                    }
                )
    table = pd.DataFrame(lines, columns=[*by, *COLUMNS])
    if table.empty:
        return table
    secondary = ~table["primary"].astype(bool)
    table["p_holm"] = table["p"]
    table.loc[secondary, "p_holm"] = holm(table.loc[secondary, "p"].to_numpy())
    table["reading"] = [_reading(row, design.alpha) for _, row in table.iterrows()]
    table["n"] = table["n"].astype(int)
    table["n_stopped"] = table["n_stopped"].astype(int)
    return table.sort_values("primary", ascending=False, kind="stable").reset_index(drop=True)


def _contrasts(design: Design, ran: set[str]) -> list[tuple[str, str]]:
    """The secondary contrasts between strategies: as declared, else per_class − centroid
    and X − shuffled (X: whose targets the shuffle permutes) where both sides ran; the
    primary's too when it is one."""
    if design.contrasts is not None:
        pairs = [(c.strategy, c.against) for c in design.contrasts]
    else:
        pairs = [("per_class", "centroid"), (design.shuffle_base, "shuffled")]
        pairs = [(a, b) for a, b in pairs if a in ran and b in ran]
    primary = design.primary
    if primary is not None and primary.against != CONTROL:
        pairs.insert(0, (primary.strategy, primary.against))
    return pairs


def _sides(seeds: pd.DataFrame, strategy: str, against: str, by: list[str]):
    """Per (setting..., metric): the per-seed differences of `strategy` minus `against`
    (the control's are 0 by construction), on the seeds where both sides have one;
    `points` the points both sides averaged."""
    keys = [*by, "metric"]
    mine = seeds[seeds["strategy"] == strategy]
    if against != CONTROL:
        theirs = seeds[seeds["strategy"] == against]
        mine = mine.merge(theirs, on=[*keys, "seed"], suffixes=("", "_other"))
        mine = mine.assign(diff=mine["diff"] - mine["diff_other"])
        mine = mine.assign(points=mine["points"] + mine["points_other"])
    if mine.empty:
        return []
    return [
        (group if isinstance(group, tuple) else (group,), values)
        for group, values in mine.groupby(keys, sort=True, dropna=False)
    ]


def _stopped(rows: list[dict[str, Any]], design: Design, cycle: int) -> dict[tuple, int]:
    """Trials per (setting..., strategy) that did not reach `cycle` complete: stopped
    early by the scheduler, or failed."""
    frame = _frame(rows, design)
    if frame.empty:
        return {}
    keys = [*design.by, "strategy"]
    reached = frame[(frame["status"] == "COMPLETE") & (frame["cycle"] == cycle)]["trial_id"]
    trials = frame.dropna(subset=["strategy"]).drop_duplicates("trial_id")
    short = trials[~trials["trial_id"].isin(set(reached))]
    sizes = short.groupby(keys, dropna=False).size()
    return {k if isinstance(k, tuple) else (k,): int(v) for k, v in sizes.items()}


def _is_primary(design: Design, strategy: str, against: str, metric: str) -> bool:
    p = design.primary
    return p is not None and (p.strategy, p.against, p.metric) == (strategy, against, metric)


def _primary_cycle(design: Design) -> int | None:
    return None if design.primary is None else design.cycle_of(design.primary)


def _reading(row: pd.Series, alpha: float) -> str:
    """The row in words: a difference (significant, after Holm unless primary), an effect
    as large as the MDE ruled out, or a test too small to tell."""
    if row["n"] < 2:
        return "one seed: no interval" if row["n"] == 1 else "no pairs"
    if not _finite(row["p"]):
        return "no spread: no test"
    if row["p_holm"] < alpha:
        return "higher" if row["mean"] > 0 else "lower"
    mde = row["mde"]
    if _finite(mde) and -mde < row["ci_low"] and row["ci_high"] < mde:
        return "no effect as large as the MDE"
    return "underpowered"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float, np.floating)) and math.isfinite(value)
