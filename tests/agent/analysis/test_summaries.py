"""agent.analysis.summaries: window/epoch summaries, step-time percentiles, throughput, bounds."""

from __future__ import annotations

import math
import time
import tracemalloc
from typing import Any

import numpy as np
import pytest

from agent.analysis.summaries import DecimatedSeries, Summaries


def summaries_of(entries: list[dict[str, Any]], scope: str) -> list[dict[str, Any]]:
    return [e for e in entries if e["kind"] == "summary" and e["scope"] == scope]


def scalars_of(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["kind"] == "scalars"]


def test_window_closes_after_window_steps_with_numpy_stats() -> None:
    """A window holds exactly window_steps steps; its mean/std/min/max/count match numpy."""
    values = np.random.default_rng(1).normal(3.0, 2.0, size=25)
    s = Summaries(window_steps=10)
    for step in range(10):
        s.observe("r", 0, step, float(step), {"loss": float(values[step])})
    assert s.take() == []  # step 9's other lines may still come
    s.observe("r", 0, 10, 10.0, {"loss": float(values[10])})
    (window,) = summaries_of(s.take(), "window")
    assert (window["index"], window["first_step"], window["last_step"]) == (0, 0, 9)
    assert window["step"] == 9 and (window["t_start"], window["t_end"]) == (0.0, 9.0)
    stats = window["metrics"]["loss"]
    expected = values[:10]
    assert stats["count"] == 10 and stats["nonfinite"] == 0
    assert stats["mean"] == pytest.approx(expected.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(expected.std(), rel=1e-12)
    assert (stats["min"], stats["max"], stats["last"]) == (
        expected.min(),
        expected.max(),
        expected[-1],
    )


def test_stats_exact_across_segment_merges() -> None:
    """Stats merged from many small segments equal numpy's over the whole window."""
    values = np.random.default_rng(2).normal(1e9, 1e3, size=1000)  # large offset: no cancellation
    s = Summaries(window_steps=1000, segment_values=7)
    for step, value in enumerate(values):
        s.observe("r", 0, step, float(step), {"mem": float(value)})
    s.close_run("r")
    stats = summaries_of(s.take(), "window")[0]["metrics"]["mem"]
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-9)


def test_nonfinite_values_counted_not_averaged() -> None:
    """NaN and inf are counted in nonfinite and kept out of mean/std/min/max/last."""
    s = Summaries(window_steps=5)
    for step, value in enumerate([1.0, math.nan, 3.0, math.inf, -math.inf]):
        s.observe("r", 0, step, float(step), {"loss": value, "bad": math.nan})
    s.close_run("r")
    metrics = summaries_of(s.take(), "window")[0]["metrics"]
    assert metrics["loss"] == {
        "mean": 2.0,
        "std": 1.0,
        "min": 1.0,
        "max": 3.0,
        "count": 2,
        "nonfinite": 3,
        "last": 3.0,
    }
    assert metrics["bad"]["count"] == 0 and metrics["bad"]["nonfinite"] == 5
    assert metrics["bad"]["mean"] is None and metrics["bad"]["last"] is None


def test_epoch_summaries_on_epoch_end_events() -> None:
    """epoch_end (and epoch) close an epoch over every line since the previous one."""
    s = Summaries(window_steps=10)
    for step in range(25):
        s.observe("r", 0, step, float(step), {"loss": float(step)})
    s.observe_event("r", 0, 24, "epoch_end")
    s.observe_event("r", 0, 24, "checkpoint")  # not an epoch
    for step in range(25, 30):
        s.observe("r", 0, step, float(step), {"loss": float(step)})
    s.observe_event("r", 0, 29, "epoch")
    s.observe_event("r", 0, 29, "epoch_end")  # nothing since: no empty epoch
    epochs = summaries_of(s.take(), "epoch")
    assert [(e["index"], e["first_step"], e["last_step"]) for e in epochs] == [
        (0, 0, 24),
        (1, 25, 29),
    ]
    assert epochs[0]["metrics"]["loss"]["count"] == 25
    assert epochs[0]["metrics"]["loss"]["mean"] == pytest.approx(12.0)
    assert epochs[1]["metrics"]["loss"]["mean"] == pytest.approx(27.0)


def test_close_run_flushes_partial_window_and_keeps_history() -> None:
    """close_run emits the last partial window and epoch; the history stays readable."""
    s = Summaries(window_steps=100)
    for step in range(7):
        s.observe("r", 0, step, float(step), {"loss": 1.0, "step_time_seconds": 0.5})
    s.observe("other", 0, 3, 0.0, {"loss": 1.0})
    s.close_run("r")
    entries = s.take()
    (window,) = summaries_of(entries, "window")
    (epoch,) = summaries_of(entries, "epoch")
    assert window["run"] == "r" and window["metrics"]["loss"]["count"] == 7
    assert epoch["metrics"]["loss"]["count"] == 7
    assert scalars_of(entries)[0]["metrics"]["step_time_seconds/p50"] == 0.5
    assert s.history("r")["loss"][0].tolist() == list(range(7))
    s.close_run("r")
    assert s.take() == []  # closing twice emits nothing


def test_step_time_percentiles_equal_numpy() -> None:
    """p50/p90/p99 of step_time_seconds per window are numpy.percentile's."""
    times = np.random.default_rng(3).lognormal(-2.0, 0.5, size=200)
    s = Summaries(window_steps=100)
    for step, value in enumerate(times):
        s.observe("r", 0, step, float(step), {"step_time_seconds": float(value)})
    s.close_run("r")
    scalars = scalars_of(s.take())
    assert [e["step"] for e in scalars] == [99, 199]
    for entry, chunk in zip(scalars, (times[:100], times[100:]), strict=True):
        p50, p90, p99 = np.percentile(chunk, [50, 90, 99])
        assert entry["metrics"]["step_time_seconds/p50"] == p50
        assert entry["metrics"]["step_time_seconds/p90"] == p90
        assert entry["metrics"]["step_time_seconds/p99"] == p99


def test_percentile_sample_is_bounded() -> None:
    """Beyond percentile_samples the sample stays bounded and the percentiles stay close."""
    times = np.random.default_rng(4).uniform(0.0, 1.0, size=20_000)
    s = Summaries(window_steps=100_000, percentile_samples=2_000)
    for step, value in enumerate(times):
        s.observe("r", 0, step, 0.0, {"step_time_seconds": float(value)})
    s.close_run("r")
    derived = scalars_of(s.take())[0]["metrics"]
    assert derived["step_time_seconds/p50"] == pytest.approx(0.5, abs=0.05)
    assert derived["step_time_seconds/p90"] == pytest.approx(0.9, abs=0.05)


def test_window_throughput_from_t() -> None:
    """window/steps_per_second comes from t; tokens/samples per second are window means."""
    s = Summaries(window_steps=10)
    for step in range(20):
        for _line in range(2):  # two lines per step: the step's first line times it
            s.observe("r", 0, step, 100.0 + 0.25 * step, {"tokens_per_second": 1000.0 + step})
    s.observe("r", 0, 20, 105.0, {"samples_per_second": 8.0})
    entries = scalars_of(s.take())
    assert [e["step"] for e in entries] == [9, 19]
    assert entries[0]["metrics"]["window/steps_per_second"] == pytest.approx(4.0)
    assert entries[0]["metrics"]["window/tokens_per_second"] == pytest.approx(1004.5)
    assert entries[1]["t"] == pytest.approx(104.75)
    assert "window/samples_per_second" not in entries[1]["metrics"]


def test_a_derived_statistic_for_an_earlier_step_neither_closes_nor_times_the_window() -> None:
    """Feature statistics come back from the workers later, at their batch's step: the
    window keeps the trainer's steps and times. (Taken as a trainer line, a step this far
    back read as a restart and cut the window in two, whose halves came out with the
    throughput of a few steps between two lines microseconds apart.)"""
    s = Summaries(window_steps=10)
    for step in range(30, 40):
        s.observe("r", 0, step, 100.0 + 0.5 * step, {"loss": 1.0})
        if step == 35:  # the statistics of step 5's features, computed now
            s.observe("r", 0, 5, 500.0, {"features/h/rank": 3.0}, derived=True)
    s.observe("r", 0, 40, 120.0, {"loss": 1.0})
    (window,) = summaries_of(s.take(), "window")
    assert (window["first_step"], window["last_step"]) == (30, 39)
    assert window["derived"]["window/steps_per_second"] == pytest.approx(2.0)
    assert window["metrics"]["features/h/rank"]["count"] == 1
    assert window["t_end"] == pytest.approx(119.5)


def test_late_line_folded_and_restart_opens_new_window() -> None:
    """A line one window late joins the open window; a restart far back closes it."""
    s = Summaries(window_steps=10)
    for step in (20, 21, 19, 22):
        s.observe("r", 0, step, float(step), {"loss": float(step)})
    assert s.take() == []
    s.observe("r", 0, 0, 50.0, {"loss": 0.0})  # resumed from an old checkpoint
    (window,) = summaries_of(s.take(), "window")
    assert window["index"] == 2 and window["metrics"]["loss"]["count"] == 4
    assert (window["first_step"], window["last_step"]) == (20, 22)


def test_bounded_metric_names_count_refusals() -> None:
    """Past max_metrics names per (run, rank) values are refused and counted."""
    s = Summaries(window_steps=10, max_metrics=5)
    for step in range(3):
        s.observe("r", 0, step, 0.0, {f"m{i}": 1.0 for i in range(8)})
    s.observe("r", 1, 0, 0.0, {"other": 1.0})  # another rank has its own budget
    s.close_run("r")
    windows = summaries_of(s.take(), "window")
    assert sorted(windows[0]["metrics"]) == [f"m{i}" for i in range(5)]
    assert list(windows[1]["metrics"]) == ["other"]
    assert s.counters()["refused_values"] == 9


def test_bounded_streams_and_pending() -> None:
    """Streams beyond max_streams are refused until a run closes; take() backlog is capped."""
    s = Summaries(window_steps=1, max_streams=2, max_pending=3)
    s.observe("a", 0, 0, 0.0, {"loss": 1.0})
    s.observe("b", 0, 0, 0.0, {"loss": 1.0})
    s.observe("c", 0, 0, 0.0, {"loss": 1.0, "lr": 0.1})
    assert s.counters()["refused_streams"] == 1 and s.counters()["refused_values"] == 2
    s.close_run("a")
    s.observe("c", 0, 0, 0.0, {"loss": 1.0})  # the closed run "a" makes room
    assert s.history("a") == {} and "loss" in s.history("c")
    for step in range(1, 10):
        s.observe("c", 0, step, float(step), {"loss": 1.0})
    assert len(s.take()) == 3 and s.counters()["dropped_entries"] > 0


def test_ranks_kept_apart() -> None:
    """Each rank has its own windows, epochs and history."""
    s = Summaries(window_steps=4)
    for step in range(4):
        s.observe("r", 0, step, 0.0, {"loss": 1.0})
        s.observe("r", 1, step, 0.0, {"loss": 5.0})
    s.observe_event("r", 1, 3, "epoch_end")
    s.close_run("r")
    entries = s.take()
    means = {
        (e["rank"], e["scope"]): e["metrics"]["loss"]["mean"]
        for e in entries
        if e["kind"] == "summary"
    }
    assert means == {(0, "window"): 1.0, (1, "window"): 5.0, (0, "epoch"): 1.0, (1, "epoch"): 5.0}
    assert s.history("r")["loss"][1].tolist() == [1.0] * 4  # rank 0 by default
    assert s.history("r", rank=1)["loss"][1].tolist() == [5.0] * 4


def test_system_samples_join_the_run_history() -> None:
    """Step-less rank -1 system samples get the run's latest step and join history(run)."""
    s = Summaries()
    s.observe("r", -1, None, 0.0, {"system/process/7/rss_bytes": 1e9, "loss": 9.0})
    for step in range(3):
        s.observe("r", 1, step + 10, 1.0, {"loss": 5.0})
        s.observe("r", 0, step, 1.0, {"loss": 1.0})
    s.observe("r", -1, None, 2.0, {"system/process/7/rss_bytes": 2e9})
    history = s.history("r")
    assert history["loss"][1].tolist() == [1.0] * 3
    x, y = history["system/process/7/rss_bytes"]
    assert x.tolist() == [12.0] and y.tolist() == [2e9]  # the first sample had no step to go on


def test_decimated_series_bounded_over_a_million_points() -> None:
    """1e6 points stay <= cap, evenly spaced, first and last kept, in well under 2 s."""
    start = time.perf_counter()
    series = DecimatedSeries(2_000)
    for i in range(1_000_000):
        series.add(i, -i)
    x, y = series.arrays()
    elapsed = time.perf_counter() - start
    assert len(x) == len(series) <= 2_000 and len(x) > 900
    assert (x[0], x[-1], y[-1]) == (0.0, 999_999.0, -999_999.0)
    assert len(set(np.diff(x[:-1]).tolist())) == 1  # even stride; the latest point is extra
    assert elapsed < 2.0


def test_history_series_via_observe() -> None:
    """history keeps only the dashboard's series, bounded, with steps as x."""
    s = Summaries(window_steps=100, history_points=50)
    for step in range(5_000):
        metrics = {"loss": 1.0 / (step + 1), "lr": 1e-3, "other": 1.0}
        if step % 100 == 0:
            metrics["features/student/effective_rank"] = 10.0
        s.observe("r", 0, step, step * 0.1, metrics)
    s.observe("r", 0, None, 1e4, {"system/process/0/rss_bytes": 1e9})  # no step: latest one
    history = s.history("r")
    assert sorted(history) == [
        "features/student/effective_rank",
        "loss",
        "lr",
        "system/process/0/rss_bytes",
        "window/steps_per_second",
    ]
    x, y = history["loss"]
    assert len(x) <= 50 and (x[0], x[-1]) == (0.0, 4999.0) and y[-1] == 1.0 / 5000
    assert history["system/process/0/rss_bytes"][0].tolist() == [4999.0]
    assert s.history("missing") == {}


def test_memory_flat_over_many_windows() -> None:
    """Once the bounded buffers are full, hundreds more windows leave (almost) nothing behind."""
    s = Summaries(window_steps=10, history_points=100, percentile_samples=100)
    names = [f"m{i}" for i in range(5)] + ["loss", "step_time_seconds"]

    def feed(start: int, stop: int) -> None:
        for step in range(start, stop):
            s.observe("r", 0, step, float(step), dict.fromkeys(names, 0.5))
            if step % 1000 == 0:
                s.take()
        s.take()

    feed(0, 3_000)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        feed(3_000, 6_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024  # ~10-30 kB of numpy-internal caches; a summary leak is ~1 kB/window


def test_invalid_arguments_raise() -> None:
    """Impossible settings fail at construction, naming the argument."""
    with pytest.raises(ValueError, match="window_steps"):
        Summaries(window_steps=0)
    with pytest.raises(ValueError, match="points"):
        DecimatedSeries(2)


def test_values_near_the_float_limit_give_an_infinite_spread_without_a_warning() -> None:
    """A metric of +-1e308 (a fuzzed or diverging value) must not make numpy warn into the
    agent's log on every window."""
    import warnings

    from agent.analysis.summaries import _reduce

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        count, _mean, m2, low, high, nonfinite, last = _reduce([1e308, -1e308, 1e308])
    assert (count, low, high, nonfinite, last) == (3, -1e308, 1e308, 0, 1e308)
    assert m2 == float("inf")
