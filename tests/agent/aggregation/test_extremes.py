"""Extremes and job scalars of a job window, against plain Python over the ranks."""

from __future__ import annotations

import random

import pytest

from agent.aggregation.extremes import extremes, job_scalars, metric_names
from agent.aggregation.windows import JobWindow
from tests.agent.aggregation.factory import job_window, stats


def window_of(ranks: int, seed: int = 0) -> JobWindow:
    rng = random.Random(seed)
    return job_window(
        3,
        {r: {"loss": rng.uniform(1, 3), "grad_norm": rng.uniform(0, 1)} for r in range(ranks)},
        {r: {"step_time_seconds/p50": rng.uniform(0.1, 0.2)} for r in range(ranks)},
    )


def test_min_max_and_who_holds_them() -> None:
    """Per metric (derived figures included): extremes, their ranks and hosts, mean, spread."""
    window = window_of(12)
    found = extremes(window)
    assert set(found) == {"loss", "grad_norm", "step_time_seconds/p50"}
    for name, extreme in found.items():
        if "/" in name:
            values = {r: s["derived"][name] for r, s in window.ranks.items()}
        else:
            values = {r: s["metrics"][name]["mean"] for r, s in window.ranks.items()}
        low, high = min(values, key=values.__getitem__), max(values, key=values.__getitem__)
        assert (extreme.min_rank, extreme.min) == (low, values[low]), name
        assert (extreme.max_rank, extreme.max) == (high, values[high]), name
        assert extreme.min_host == f"node{low // 4}" and extreme.max_host == f"node{high // 4}"
        assert extreme.spread == pytest.approx(values[high] - values[low])
        assert extreme.mean == pytest.approx(sum(values.values()) / 12)
        assert extreme.ranks == 12


def test_ranks_without_a_finite_value_are_left_out() -> None:
    """A rank that lacks the metric, or had only NaN in the window, does not count."""
    window = job_window(
        0,
        {0: {"loss": 2.0}, 1: {"loss": stats(None, nonfinite=3)}, 2: {"loss": 4.0}, 3: {}},
    )
    loss = extremes(window)["loss"]
    assert (loss.min_rank, loss.max_rank, loss.ranks, loss.mean) == (0, 2, 2, 3.0)
    assert extremes(job_window(0, {0: {"loss": stats(None, nonfinite=1)}})) == {}


def test_metrics_are_bounded() -> None:
    """Only the first max_metrics names, sorted, are considered."""
    window = job_window(0, {r: {f"m{k:02d}": float(k) for k in range(20)} for r in range(3)})
    assert metric_names(window, 5) == ["m00", "m01", "m02", "m03", "m04"]
    assert sorted(extremes(window, max_metrics=5)) == ["m00", "m01", "m02", "m03", "m04"]


def test_job_scalars() -> None:
    """job/<metric>/mean|min|max|spread, the ranks reporting and missing, straggler counts."""
    window = window_of(6)
    window.missing = [6, 7]
    found = extremes(window)
    scores = {0: (1.0, 1.0), 1: (0.7, 0.9), 2: (0.9, 0.6), 3: (0.8, 0.8)}
    scalars = job_scalars(window, scores)
    assert scalars["job/ranks_reporting"] == 6 and scalars["job/ranks_missing"] == 2
    assert scalars["job/stragglers"] == 2
    assert scalars["job/straggler_score/relative_min"] == 0.7
    assert scalars["job/straggler_score/individual_min"] == 0.6
    slowest = max(s["derived"]["step_time_seconds/p50"] for s in window.ranks.values())
    assert scalars["job/step_time_seconds/p50/max"] == slowest
    for name, extreme in found.items():
        assert scalars[f"job/{name}/mean"] == extreme.mean
        assert scalars[f"job/{name}/min"] == extreme.min
        assert scalars[f"job/{name}/max"] == extreme.max
        assert scalars[f"job/{name}/spread"] == extreme.spread
    assert len(scalars) == 2 + 3 + 4 * len(found)
    assert job_scalars(window, scores, found=found) == scalars
    assert "job/stragglers" not in job_scalars(window)
    assert job_scalars(window, scores, threshold=0.95)["job/stragglers"] == 3
