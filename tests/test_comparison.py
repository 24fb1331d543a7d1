"""comparison.csv on a hand-made sweep: paired by seed against the control, intervals and
p-values as scipy computes them from the differences, Holm's adjustment by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sae_ray.sweep.comparison import comparison, holm, paired_differences


def _row(trial, strategy, seed, u, acc, status="COMPLETE"):
    return {
        "trial_id": trial,
        "cycle": 1,
        "experiment.seed": seed,
        "strategy_effective": strategy,
        "is_control": strategy == "none",
        "interp/u": u,
        "val/accuracy": acc,
        "status": status,
    }


CONTROL_U = {0: 0.30, 1: 0.32, 2: 0.28, 3: 0.31}
PER_CLASS_U = {0: 0.36, 1: 0.35, 2: 0.33, 3: 0.39}
RANDOM_U = {0: 0.29, 1: 0.33, 2: 0.28, 3: 0.30}
ROWS = (
    [_row(f"c{s}", "none", s, u, 0.9) for s, u in CONTROL_U.items()]
    + [_row(f"p{s}", "per_class", s, u, 0.9 - 0.01 * s) for s, u in PER_CLASS_U.items()]
    + [_row(f"r{s}", "random", s, u, 0.9) for s, u in RANDOM_U.items()]
    + [_row("bad", "per_class", 9, math.nan, math.nan, status="ERROR")]
)


def test_differences_are_paired_by_seed_with_the_control():
    diffs = paired_differences(ROWS, seed=0)
    u = diffs[(diffs["strategy"] == "per_class") & (diffs["metric"] == "interp/u")]
    assert sorted(u["seed"]) == [0, 1, 2, 3]  # the errored trial has no pair
    for _, row in u.iterrows():
        assert row["diff"] == pytest.approx(PER_CLASS_U[row["seed"]] - CONTROL_U[row["seed"]])


def test_intervals_and_p_values_equal_scipys():
    table = comparison(ROWS, seed=0).set_index(["strategy", "metric"])
    for strategy, values in (("per_class", PER_CLASS_U), ("random", RANDOM_U)):
        d = np.array([values[s] - CONTROL_U[s] for s in range(4)])
        row = table.loc[(strategy, "interp/u")]
        half = stats.t.ppf(0.975, df=3) * d.std(ddof=1) / math.sqrt(4)
        assert row["n"] == 4 and row["mean"] == pytest.approx(d.mean())
        assert row["ci_low"] == pytest.approx(d.mean() - half)
        assert row["ci_high"] == pytest.approx(d.mean() + half)
        t = d.mean() / (d.std(ddof=1) / 2)
        assert row["p"] == pytest.approx(2 * stats.t.sf(abs(t), df=3))
        assert row["effect_size"] == pytest.approx(d.mean() / d.std(ddof=1))
    assert table.loc[("per_class", "interp/u"), "ci_low"] > 0  # a real gain
    assert (
        table.loc[("random", "interp/u"), "ci_low"]
        < 0
        < table.loc[("random", "interp/u"), "ci_high"]
    )
    # identical differences (random's accuracy) have no spread: no interval, no p-value
    assert math.isnan(table.loc[("random", "val/accuracy"), "p"])


def test_holm_adjusts_step_down_and_stays_monotone():
    p = np.array([0.01, 0.04, 0.03, math.nan, 0.005])
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.06 (monotone)
    np.testing.assert_allclose(holm(p), [0.03, 0.06, 0.06, math.nan, 0.02])
    table = comparison(ROWS, seed=0)
    finite = table["p"].notna()
    assert (table.loc[finite, "p_holm"] >= table.loc[finite, "p"]).all()


def test_a_sweep_without_a_control_compares_nothing():
    assert comparison([r for r in ROWS if r["strategy_effective"] != "none"], 0).empty
    assert isinstance(comparison([], 0), pd.DataFrame)


def test_a_point_run_twice_at_one_seed_counts_once():
    """TPE re-suggests a point of a discrete space; its rerun finds every stage and reports
    the same numbers. Counted twice, the copies would narrow the interval."""
    params = ["sae.k", "sharpening.strategy"]

    def point(row, k):
        return {**row, "sae.k": k, "sharpening.strategy": row["strategy_effective"]}

    rows = [point(r, 8) for r in ROWS]
    again = [point(r, 8) | {"trial_id": f"{r['trial_id']}-again"} for r in ROWS[4:8]]
    other_k = [point(r, 4) | {"trial_id": f"{r['trial_id']}-k4"} for r in ROWS[4:8]]
    once = comparison(rows, 0, params).set_index(["strategy", "metric"])
    twice = comparison(rows + again, 0, params).set_index(["strategy", "metric"])
    pd.testing.assert_frame_equal(once, twice)
    assert twice.loc[("per_class", "interp/u"), "n"] == 4
    # another setting of the SAE is another experiment; without params every trial is one
    assert (
        comparison(rows + other_k, 0, params)
        .set_index(["strategy", "metric"])
        .loc[("per_class", "interp/u"), "n"]
        == 8
    )
    assert (
        comparison(rows + again, 0)
        .set_index(["strategy", "metric"])
        .loc[("per_class", "interp/u"), "n"]
        == 8
    )


def test_the_breakdown_compares_within_each_searched_setting():
    """TopK gains, JumpReLU does not: the pooled row mixes them, the breakdown tells them
    apart, each row the pooled computation on that setting's pairs."""
    from sae_ray import config as C
    from sae_ray.sweep.comparison import comparison_by_setting, settings

    space = {
        "sae.architecture": C.SpaceEntry(type="choice", values=["topk", "jumprelu"]),
        "sharpening.strategy": C.SpaceEntry(type="choice", values=["per_class", "none"]),
        "sae.lr": C.SpaceEntry(type="loguniform", low=1e-4, high=1e-2),
    }
    assert settings(space) == ["sae.architecture"]  # a continuous key names no setting
    rows = []
    for arch, gain in (("topk", 0.05), ("jumprelu", 0.0)):
        for r in ROWS:
            if r["status"] != "COMPLETE":
                continue
            strategy = r["strategy_effective"]
            u = r["interp/u"] + (gain if strategy == "per_class" else 0.0)
            point = {"sae.architecture": arch, "sharpening.strategy": strategy}
            rows.append(r | point | {"trial_id": f"{arch}-{r['trial_id']}", "interp/u": u})
    params = list(space)
    split = comparison_by_setting(rows, 0, params, settings(space))
    split = split.set_index(["sae.architecture", "strategy", "metric"])
    for arch, gain in (("topk", 0.05), ("jumprelu", 0.0)):
        d = np.array([PER_CLASS_U[s] + gain - CONTROL_U[s] for s in range(4)])
        row = split.loc[(arch, "per_class", "interp/u")]
        assert row["n"] == 4 and row["mean"] == pytest.approx(d.mean())
        assert row["p"] == pytest.approx(stats.ttest_1samp(d, 0).pvalue)
    pooled = comparison(rows, 0, params).set_index(["strategy", "metric"])
    assert pooled.loc[("per_class", "interp/u"), "n"] == 8
    assert (split["p_holm"].dropna() >= split["p"].dropna()).all()
