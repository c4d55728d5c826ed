"""Intervals against values computed by hand, and the metric registry's aggregation."""

from __future__ import annotations

import math

import pytest

from paretoray.actors import stats
from paretoray.actors.metrics import METRICS, aggregate, metric_direction, metric_names


def test_wilson_interval_for_zero_one_scores():
    # k = 3 of n = 6, z = 1.96: centre 0.5, half-width 1.96 * sqrt(1/24 + z^2/144) / (1 + z^2/6) = 0.3124.
    low, high = stats.mean_interval([1, 0, 1, 0, 1, 0])
    assert low == pytest.approx(0.1876, abs=1e-4) and high == pytest.approx(0.8124, abs=1e-4)
    low, high = stats.mean_interval([1.0] * 10)  # stays inside [0, 1], unlike the normal approximation
    assert high == pytest.approx(1.0) and low == pytest.approx(0.7225, abs=1e-4)


def test_bootstrap_interval_for_graded_scores_is_seeded_and_covers_the_mean():
    values = [0.2, 0.5, 0.5, 0.9, 1.0, 0.75, 0.3, 0.6]
    low, high = stats.mean_interval(values)
    assert (low, high) == stats.mean_interval(values)
    mean = sum(values) / len(values)
    assert low < mean < high and 0.2 <= low and high <= 1.0
    assert stats.mean_interval([0.4, 0.4, 0.4]) == (0.4, 0.4)


def test_median_interval_uses_order_statistics():
    # n = 20: P(Binomial(20, 1/2) <= 5) = 0.0207 <= 0.025 < P(<= 6): ranks 6 and 15 (1-based).
    assert stats.median_interval(list(range(1, 21))) == (6.0, 15.0)
    # Below 6 values no pair of ranks reaches 95%: the whole range.
    assert stats.median_interval([3.0, 1.0, 2.0]) == (1.0, 3.0)
    assert stats.median_interval([0.9, math.nan, 1.1]) == (0.9, 1.1)
    assert all(math.isnan(v) for v in stats.median_interval([]))


def test_ratio_of_means_interval_is_paired():
    tech = [1, 0, 1, 1, 0, 1, 1, 1]
    dense = [1, 1, 1, 1, 0, 1, 1, 1]
    low, high = stats.ratio_of_means_interval(tech, dense)
    assert low <= (6 / 7) <= high <= 1.0


def test_aggregate_follows_the_registry():
    rows = [
        {"context_length": 256, "accuracy": 1.0, "dense_accuracy": 1.0, "speedup": 1.2, "latency_ms_per_token": 10.0,
         "kv_cache_bytes": 2**20, "new_tokens": 5, "target_calls": 4},
        {"context_length": 256, "accuracy": 0.0, "dense_accuracy": 1.0, "speedup": 1.4, "latency_ms_per_token": 20.0,
         "kv_cache_bytes": 2**21, "new_tokens": 5, "target_calls": 4},
        {"context_length": 512, "accuracy": 1.0, "dense_accuracy": 0.0, "speedup": 1.3, "latency_ms_per_token": 30.0,
         "kv_cache_bytes": 2**20, "new_tokens": 3, "target_calls": 2},
    ]
    out = aggregate(rows, [256, 512])
    assert out["accuracy"] == pytest.approx(2 / 3) and out["accuracy/ctx256"] == 0.5 and out["accuracy/ctx512"] == 1.0
    assert out["accuracy_ci_low"] < 2 / 3 < out["accuracy_ci_high"]
    assert out["accuracy/ctx256_ci_low"] < 0.5 < out["accuracy/ctx256_ci_high"]  # each part its own interval
    assert out["relative_accuracy"] == pytest.approx((2 / 3) / (2 / 3))
    assert out["speedup"] == 1.3 and (out["speedup_ci_low"], out["speedup_ci_high"]) == (1.2, 1.4)
    assert out["latency_ms_per_token"] == 20.0 and out["tokens_per_s"] == 50.0
    assert out["kv_cache_mb"] == 2.0 and out["target_calls_per_token"] == 1.0
    assert "acceptance_rate" not in out and "fidelity" not in out  # nothing to aggregate: absent, not NaN


def test_interval_bounds_are_valid_objective_names_with_their_metric_direction():
    assert "accuracy_ci_low" in metric_names() and "speedup_ci_high" in metric_names()
    assert "latency_ms_per_token_ci_low" not in metric_names()  # no interval declared
    assert metric_direction("accuracy_ci_low") == "maximize"
    assert metric_direction("accuracy/ctx1024") == "maximize"
    assert metric_direction("nope") is None
    assert all(m.aggregate is not None for m in METRICS.values())


def test_relative_accuracy_interval_keeps_resamples_where_dense_scored_nothing():
    low, high = stats.ratio_of_means_interval([1.0] * 10, [1.0] + [0.0] * 9)
    assert low <= 10.0 and high == math.inf  # the point estimate inside; dense's zeros leave it unbounded
    out = aggregate([{"accuracy": 1.0, "dense_accuracy": math.nan}, {"accuracy": 1.0, "dense_accuracy": 1.0}])
    assert out["relative_accuracy"] == 1.0  # NaN rows are left out of the point and the interval alike


def test_breakdowns_and_bounds_exist_only_where_the_registry_declares_them():
    assert metric_direction("relative_accuracy/ctx1024") is None  # not broken down
    assert metric_direction("accuracy/bogus") == "maximize"  # a suite entry's name is not known here
    assert metric_direction("accuracy/niah_ci_low") is None
    assert metric_direction("kv_cache_mb/foo") is None


def test_a_constraint_on_an_absent_metric_makes_the_trial_infeasible():
    from paretoray.orchestrator.spec import Constraint

    assert Constraint("relative_accuracy", ">=", 0.9).violation({"accuracy": 0.0}) == math.inf
    assert Constraint("accuracy", ">=", 0.5).violation({"accuracy": math.nan}) == math.inf
    assert Constraint("accuracy", ">=", 0.5).violation({"accuracy": 0.75}) == -0.25
