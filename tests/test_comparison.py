"""comparison.csv on hand-made sweeps: the seed is the unit (a strategy's points averaged
within each seed first), only trials that reached the compared cycle count, contrasts
between strategies, one primary contrast unadjusted, intervals, p-values and minimum
detectable effects as scipy and statsmodels compute them from the per-seed differences."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from statsmodels.stats.power import TTestPower

from sae_ray.config.analysis import Contrast, Primary
from sae_ray.sweep.comparison import (
    COLUMNS,
    Design,
    comparison,
    holm,
    paired_differences,
    seeds_needed,
    settings,
)

DESIGN = Design(seed=0, last=1)


def _row(trial, strategy, seed, u, acc, status="COMPLETE", cycle=1, **extra):
    return {
        "trial_id": trial,
        "cycle": cycle,
        "experiment.seed": seed,
        "strategy_effective": strategy,
        "is_control": strategy == "none",
        "interp/u": u,
        "val/accuracy": acc,
        "status": status,
        **extra,
    }


CONTROL_U = {0: 0.30, 1: 0.32, 2: 0.28, 3: 0.31}
PER_CLASS_U = {0: 0.36, 1: 0.35, 2: 0.33, 3: 0.39}
RANDOM_U = {0: 0.29, 1: 0.33, 2: 0.28, 3: 0.30}
CENTROID_U = {0: 0.33, 1: 0.31, 2: 0.30, 3: 0.35}
ROWS = (
    [_row(f"c{s}", "none", s, u, 0.9) for s, u in CONTROL_U.items()]
    + [_row(f"p{s}", "per_class", s, u, 0.9 - 0.01 * s) for s, u in PER_CLASS_U.items()]
    + [_row(f"r{s}", "random", s, u, 0.9) for s, u in RANDOM_U.items()]
    + [_row("bad", "per_class", 9, math.nan, math.nan, status="ERROR")]
)


def _table(rows, design=DESIGN):
    return comparison(rows, design).set_index(["strategy", "against", "metric"])


def test_differences_are_paired_by_seed_with_the_control():
    diffs = paired_differences(ROWS, DESIGN, cycle=1)
    u = diffs[(diffs["strategy"] == "per_class") & (diffs["metric"] == "interp/u")]
    assert sorted(u["seed"]) == [0, 1, 2, 3]  # the errored trial has no pair
    for _, row in u.iterrows():
        assert row["diff"] == pytest.approx(PER_CLASS_U[row["seed"]] - CONTROL_U[row["seed"]])


def test_intervals_p_values_and_mde_equal_scipy_and_statsmodels():
    table = _table(ROWS)
    assert list(comparison(ROWS, DESIGN).columns) == COLUMNS
    for strategy, values in (("per_class", PER_CLASS_U), ("random", RANDOM_U)):
        d = np.array([values[s] - CONTROL_U[s] for s in range(4)])
        row = table.loc[(strategy, "none", "interp/u")]
        half = stats.t.ppf(0.975, df=3) * d.std(ddof=1) / math.sqrt(4)
        assert row["n"] == 4 and row["n_points"] == 1 and row["mean"] == pytest.approx(d.mean())
        assert row["ci_low"] == pytest.approx(d.mean() - half)
        assert row["ci_high"] == pytest.approx(d.mean() + half)
        t = d.mean() / (d.std(ddof=1) / 2)
        assert row["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=3))
        assert row["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
        dz = TTestPower().solve_power(nobs=4, alpha=0.05, power=0.8)
        assert row["mde"] == pytest.approx(dz * d.std(ddof=1))
    assert table.loc[("per_class", "none", "interp/u"), "ci_low"] > 0  # a real gain
    random = table.loc[("random", "none", "interp/u")]
    assert random["ci_low"] < 0 < random["ci_high"]
    # its interval lies within ±MDE: an effect that size is ruled out at n = 4
    assert random["reading"] == "no effect as large as the MDE"
    lifts = {0: 0.01, 1: -0.002, 2: 0.015, 3: 0.0}  # a gain the interval can neither show
    wide = [_row(f"e{s}", "per_example", s, CONTROL_U[s] + d, 0.9) for s, d in lifts.items()]
    row = _table(ROWS + wide).loc[("per_example", "none", "interp/u")]
    assert row["ci_low"] < 0 and row["ci_high"] > row["mde"]  # nor rule out
    assert row["reading"] == "underpowered"
    # identical differences (random's accuracy) have no spread: no interval, no p-value
    assert math.isnan(table.loc[("random", "none", "val/accuracy"), "p"])


def test_points_at_one_seed_are_one_pair_not_three():
    """The audit's case: one seed, three per_class points (k 8 / 16 / 32) whose deltas are
    .004 / .006 / .005. Pooled as pairs they made n = 3, CI [.0025, .0075], p = .013; they
    share the seed's cycle-0 model and control chain, so they are one difference."""
    params = ["sae.k", "sharpening.strategy"]
    rows = [_row("c", "none", 0, 0.3, 0.9, **{"sae.k": 8, "sharpening.strategy": "none"})]
    for k, delta in ((8, 0.004), (16, 0.006), (32, 0.005)):
        extra = {"sae.k": k, "sharpening.strategy": "per_class", "delta/interp/u": delta}
        rows.append(_row(f"p{k}", "per_class", 0, 0.3 + delta, 0.9, **extra))
    row = _table(rows, Design(seed=0, last=1, params=params)).loc[("per_class", "none", "interp/u")]
    assert row["n"] == 1 and row["n_points"] == 3
    assert row["mean"] == pytest.approx(0.005)
    assert math.isnan(row["ci_low"]) and math.isnan(row["p"]) and math.isnan(row["mde"])
    assert row["reading"] == "one seed: no interval"
    # two seeds of the same three points: n = 2, each seed's points averaged first
    again = [{**r, "experiment.seed": 1, "trial_id": f"{r['trial_id']}-s1"} for r in rows]
    for r in again[1:]:
        r["delta/interp/u"] += 0.002
    two = _table(rows + again, Design(seed=0, last=1, params=params))
    row = two.loc[("per_class", "none", "interp/u")]
    assert row["n"] == 2 and row["n_points"] == 3
    assert row["mean"] == pytest.approx(0.006)
    assert row["p"] == pytest.approx(stats.ttest_1samp([0.005, 0.007], 0).pvalue)


def test_a_trial_stopped_early_is_counted_apart_not_as_zero():
    """ASHA with grace 1 stops a trial after cycle 0, where its delta is 0 by construction;
    read as a pair it pulled the mean to 0 (n 3 -> 4, p .013 -> .065)."""
    seeds = {0: 0.004, 1: 0.006, 2: 0.005}
    rows = [_row(f"c{s}", "none", s, 0.3, 0.9) for s in range(4)]
    rows += [
        _row(f"p{s}", "per_class", s, 0.3 + d, 0.9, **{"delta/interp/u": d})
        for s, d in seeds.items()
    ]
    rows += [_row("p3", "per_class", 3, 0.3, 0.9, cycle=0, **{"delta/interp/u": 0.0})]
    row = _table(rows).loc[("per_class", "none", "interp/u")]
    assert row["n"] == 3 and row["n_stopped"] == 1
    assert row["p"] == pytest.approx(stats.ttest_1samp(list(seeds.values()), 0).pvalue)


def test_contrasts_between_strategies_pair_by_seed():
    rows = ROWS + [_row(f"m{s}", "centroid", s, u, 0.9) for s, u in CENTROID_U.items()]
    table = _table(rows)  # per_class − centroid: a default contrast when both ran
    d = np.array([PER_CLASS_U[s] - CENTROID_U[s] for s in range(4)])
    row = table.loc[("per_class", "centroid", "interp/u")]
    assert row["n"] == 4 and row["n_points"] == 2  # a point on each side
    assert row["mean"] == pytest.approx(d.mean())
    assert row["p"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    declared = Design(seed=0, last=1, contrasts=[Contrast(strategy="random", against="centroid")])
    table = _table(rows, declared)
    assert ("random", "centroid", "interp/u") in table.index
    assert ("per_class", "centroid", "interp/u") not in table.index


def test_the_shuffled_control_is_named_by_whose_targets_it_permutes():
    shuffled = {0: 0.31, 1: 0.30, 2: 0.29, 3: 0.33}
    rows = ROWS + [_row(f"s{s}", "shuffled", s, u, 0.9) for s, u in shuffled.items()]
    table = _table(rows, Design(seed=0, last=1, shuffle_base="per_class"))
    d = np.array([PER_CLASS_U[s] - shuffled[s] for s in range(4)])
    row = table.loc[("per_class", "shuffled(per_class)", "interp/u")]
    assert row["mean"] == pytest.approx(d.mean())
    assert ("shuffled(per_class)", "none", "interp/u") in table.index


def test_the_primary_contrast_is_unadjusted_and_the_rest_holm_adjusted():
    primary = Primary(strategy="per_class", metric="interp/u")
    table = comparison(ROWS, Design(seed=0, last=1, primary=primary))
    assert table.iloc[0]["primary"] and table["primary"].sum() == 1  # first, and alone
    top = table.iloc[0]
    assert (top["strategy"], top["against"], top["metric"]) == ("per_class", "none", "interp/u")
    assert top["p_holm"] == top["p"]
    assert top["reading"] == "higher"
    rest = table[~table["primary"]]
    np.testing.assert_allclose(rest["p_holm"], holm(rest["p"].to_numpy()))


def test_a_primary_contrast_at_an_earlier_cycle_reads_that_cycle():
    early = [{**r, "cycle": 0, "trial_id": r["trial_id"]} for r in ROWS]
    for r in early:
        r["interp/u"] = r["interp/u"] - 0.01 * (r["strategy_effective"] == "per_class")
    primary = Primary(strategy="per_class", metric="interp/u", cycle=0)
    table = comparison(ROWS + early, Design(seed=0, last=1, primary=primary))
    top = table.iloc[0]
    assert top["primary"] and top["cycle"] == 0
    d = [PER_CLASS_U[s] - 0.01 - CONTROL_U[s] for s in range(4)]
    assert top["mean"] == pytest.approx(np.mean(d))
    assert set(table.loc[~table["primary"], "cycle"]) == {1}  # the rest: the final cycle


def test_holm_adjusts_step_down_and_stays_monotone():
    p = np.array([0.01, 0.04, 0.03, math.nan, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, math.nan, 0.02])
    table = comparison(ROWS, DESIGN)
    finite = table["p"].notna()
    assert (table.loc[finite, "p_holm"] >= table.loc[finite, "p"]).all()


def test_a_sweep_without_a_control_compares_nothing():
    assert comparison([r for r in ROWS if r["strategy_effective"] != "none"], DESIGN).empty
    assert isinstance(comparison([], DESIGN), pd.DataFrame)


def test_a_point_run_twice_at_one_seed_counts_once():
    """TPE re-suggests a point of a discrete space; its rerun finds every stage and reports
    the same numbers. Counted twice, the copies would narrow the interval."""
    params = ["sae.k", "sharpening.strategy"]
    design = Design(seed=0, last=1, params=params)

    def point(row, k):
        return {**row, "sae.k": k, "sharpening.strategy": row["strategy_effective"]}

    rows = [point(r, 8) for r in ROWS]
    again = [point(r, 8) | {"trial_id": f"{r['trial_id']}-again"} for r in ROWS[4:8]]
    pd.testing.assert_frame_equal(comparison(rows, design), comparison(rows + again, design))
    # another k is another point, but at the same seed: averaged in, n stays the seeds
    other_k = [point(r, 4) | {"trial_id": f"{r['trial_id']}-k4"} for r in ROWS[4:8]]
    row = _table(rows + other_k, design).loc[("per_class", "none", "interp/u")]
    assert row["n"] == 4 and row["n_points"] == 2


def test_the_breakdown_compares_within_each_searched_setting():
    """TopK gains, JumpReLU does not: the pooled row mixes them, the breakdown tells them
    apart; a continuous key (lr) names no setting, so its points are averaged per seed."""
    from sae_ray import config as C

    space = {
        "sae.architecture": C.SpaceEntry(type="choice", values=["topk", "jumprelu"]),
        "sharpening.strategy": C.SpaceEntry(type="choice", values=["per_class", "none"]),
        "sae.lr": C.SpaceEntry(type="loguniform", low=1e-4, high=1e-2),
    }
    assert settings(space) == ["sae.architecture"]
    rows = []
    for arch, gain in (("topk", 0.05), ("jumprelu", 0.0)):
        for lr, shift in ((1e-3, 0.0), (3e-3, 0.01)):
            for r in ROWS:
                if r["status"] != "COMPLETE":
                    continue
                strategy = r["strategy_effective"]
                lift = gain + shift if strategy == "per_class" else 0.0
                point = {"sae.architecture": arch, "sharpening.strategy": strategy, "sae.lr": lr}
                name = f"{arch}-{lr}-{r['trial_id']}"
                rows.append(r | point | {"trial_id": name, "interp/u": r["interp/u"] + lift})
    design = Design(seed=0, last=1, params=list(space), by=settings(space))
    split = comparison(rows, design).set_index(["sae.architecture", "strategy", "metric"])
    for arch, gain in (("topk", 0.05), ("jumprelu", 0.0)):
        d = np.array([PER_CLASS_U[s] + gain + 0.005 - CONTROL_U[s] for s in range(4)])
        row = split.loc[(arch, "per_class", "interp/u")]
        assert row["n"] == 4 and row["n_points"] == 2 and row["mean"] == pytest.approx(d.mean())
        assert row["p"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    pooled = _table(rows, Design(seed=0, last=1, params=list(space)))
    assert pooled.loc[("per_class", "none", "interp/u"), "n"] == 4
    assert pooled.loc[("per_class", "none", "interp/u"), "n_points"] == 4
    assert (split["p_holm"].dropna() >= split["p"].dropna()).all()


def test_seeds_needed_for_an_effect():
    assert seeds_needed(1.0) == 10  # d_z = 1 at 80 % power, two-sided .05
    assert seeds_needed(0.5) == 34
    assert seeds_needed(2.0) == 5
