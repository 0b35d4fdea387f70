"""Recommendation rules over a run's series, alerts and run.json: each fires on the numbers
its docs name, says them, and stays silent on a healthy run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.reports.recommendations import Evidence, Recommendation, recommend
from agent.store.series import RunLog, Series
from tests.agent.reports.test_convergence import decaying

STEPS = 1000
GIB = float(1 << 30)


def run_log(
    rank_metrics: dict[int, dict[str, np.ndarray]],
    system: dict[str, np.ndarray] | None = None,
    alerts: list[dict[str, Any]] | None = None,
) -> RunLog:
    """A run as RunLog holds it: per-rank trainer series at 10 steps/s from t=1000, system
    series (rank -1, no step) one sample a second."""
    log = RunLog(Path("unused"))
    for rank, metrics in rank_metrics.items():
        for name, values in metrics.items():
            series = log.series.setdefault(name, Series(name))
            for step, value in enumerate(values):
                series.add(float(step), 1000.0 + step / 10, float(value), rank)
    for name, values in (system or {}).items():
        series = log.series.setdefault(name, Series(name))
        for index, value in enumerate(values):
            series.add(math.nan, 1000.0 + index, float(value), -1)
    log.alerts.extend(alerts or [])
    return log


def healthy_metrics(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = np.arange(STEPS)
    return {
        "loss": decaying(STEPS, seed),
        "lr": 3e-4 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * x / STEPS))),
        "grad_norm": (0.8 + 2.0 * np.exp(-x / 125)) * np.exp(0.1 * rng.normal(size=STEPS)),
        "step_time_seconds": np.full(STEPS, 0.1),
        "data_wait_seconds": np.full(STEPS, 0.002),
    }


def healthy_system(samples: int = 100) -> dict[str, np.ndarray]:
    return {
        "system/cpu_percent": np.full(samples, 40.0),
        "system/memory_used_bytes": np.full(samples, 20 * GIB),
        "system/memory_total_bytes": np.full(samples, 256 * GIB),
        "system/process/4242/rss_bytes": np.full(samples, 6 * GIB),
        "system/process/4242/children": np.full(samples, 8.0),
        "system/gpu0/util_percent": np.full(samples, 97.0),
        "system/gpu0/memory_used_bytes": np.full(samples, 60 * GIB),
        "system/gpu0/memory_total_bytes": np.full(samples, 80 * GIB),
    }


def found(log: RunLog, info: dict[str, Any] | None = None) -> dict[str, Recommendation]:
    return {r.rule: r for r in recommend(Evidence.gather(log, info or {}))}


def test_healthy_run_gets_no_warning() -> None:
    """A decaying loss, busy GPU, little data wait: nothing above info."""
    recommendations = found(run_log({0: healthy_metrics()}, healthy_system()))
    assert all(r.severity == "info" for r in recommendations.values()), recommendations
    assert not recommendations.keys() & {"input_bound", "gpu_underused", "lr_too_high"}


def test_input_bound_run_gets_more_loader_workers() -> None:
    """Rank 1 waits 45% of its step with the GPU at 30%: more workers, with its numbers."""
    metrics = {0: healthy_metrics(), 1: healthy_metrics(1)}
    metrics[1]["data_wait_seconds"] = np.full(STEPS, 0.045)
    system = healthy_system()
    system["system/gpu0/util_percent"] = np.full(100, 30.0)
    system["system/process/4242/children"] = np.zeros(100)
    recommendations = found(run_log(metrics, system))
    rec = recommendations["input_bound"]
    assert rec.severity == "warning"
    assert rec.figures["rank"] == 1
    assert rec.figures["data_wait_share"] == pytest.approx(0.45)
    assert "45%" in rec.finding and "num_workers=0" in rec.finding
    assert "num_workers" in rec.action
    assert "input pipeline first" in recommendations["gpu_underused"].action


def test_input_bound_on_a_saturated_host_does_not_ask_for_more_workers() -> None:
    """With every CPU busy, the action moves the work offline instead."""
    metrics = healthy_metrics()
    metrics["data_wait_seconds"] = np.full(STEPS, 0.05)
    system = healthy_system()
    system["system/cpu_percent"] = np.full(100, 97.0)
    rec = found(run_log({0: metrics}, system))["input_bound"]
    assert "saturated" in rec.action and rec.figures["host_cpu_median_percent"] == 97.0


def test_gpu_underused_with_memory_room_suggests_a_larger_batch() -> None:
    """Util median 20% and 10 of 80 GiB used: raise the batch size; busy GPUs: silent."""
    system = healthy_system()
    system["system/gpu0/util_percent"] = np.full(100, 20.0)
    system["system/gpu0/memory_used_bytes"] = np.full(100, 10 * GIB)
    rec = found(run_log({0: healthy_metrics()}, system))["gpu_underused"]
    assert rec.figures["util_median_percent"] == {"0": 20.0}
    assert rec.action.startswith("Raise the batch size")


def test_memory_near_the_limit() -> None:
    """GPU at 95% of its memory and host at 93%: both named with their GiB."""
    system = healthy_system()
    system["system/gpu0/memory_used_bytes"] = np.full(100, 76 * GIB)
    system["system/memory_used_bytes"] = np.full(100, 238 * GIB)
    recommendations = found(run_log({0: healthy_metrics()}, system))
    assert "76.0 of 80.0 GiB" in recommendations["gpu_memory_near_limit"].finding
    assert recommendations["host_memory_near_limit"].figures["peak_share"] == pytest.approx(
        238 / 256
    )


def test_spikes_with_a_rising_gradient_norm_mean_the_lr_is_too_high() -> None:
    """Three spikes while grad_norm doubles: lr_too_high; the same spikes with a steady
    gradient norm are bad batches (info), not the LR."""
    metrics = healthy_metrics()
    for step in (400, 600, 800):
        metrics["loss"][step] *= 10
    steady = found(run_log({0: metrics}))
    assert "lr_too_high" not in steady
    assert steady["loss_spikes"].figures["spike_steps"] == [400.0, 600.0, 800.0]
    metrics["grad_norm"] = np.r_[np.full(750, 1.0), np.full(250, 2.5)]
    rising = found(run_log({0: metrics}))
    rec = rising["lr_too_high"]
    assert rec.figures["spikes"] == 3 and rec.figures["grad_norm_growth"] == pytest.approx(2.5)
    assert "loss_spikes" not in rising


def test_nan_loss_is_critical_and_first() -> None:
    """A NaN loss comes first, with the step it started."""
    metrics = healthy_metrics()
    metrics["loss"][640:] = math.nan
    recommendations = recommend(Evidence.gather(run_log({0: metrics}), {}))
    assert recommendations[0].rule == "nonfinite" and recommendations[0].severity == "critical"
    assert recommendations[0].figures["first_step"] == 640


def test_overfitting_from_validation_rising_off_its_best() -> None:
    """val/loss 10% above its best at the end while the train loss falls."""
    log = run_log({0: healthy_metrics()})
    val = log.series["val/loss"] = Series("val/loss")
    for step, value in zip(
        range(99, 1000, 100), [3, 2.5, 2.2, 2.0, 2.0, 2.05, 2.1, 2.15, 2.2, 2.2], strict=True
    ):
        val.add(float(step), 0.0, value, 0)
    rec = found(log)["overfitting"]
    assert rec.figures["best_step"] == 399 and rec.figures["above_best"] == pytest.approx(0.1)


def test_straggler_from_the_job_view() -> None:
    """run.json's job names rank 3 on node1: the straggler recommendation says so."""
    job = {
        "ranks": [
            {"rank": 0, "host": "node0", "relative_score": 1.0, "straggler": False},
            {"rank": 3, "host": "node1", "relative_score": 0.61, "straggler": True},
        ],
        "stragglers": [3],
    }
    rec = found(run_log({0: healthy_metrics()}), {"job": job})["straggler"]
    assert rec.figures["ranks"] == [3]
    assert "rank 3 on node1, 0.61x" in rec.finding
    assert "straggler" not in found(run_log({0: healthy_metrics()}), {"job": {"ranks": []}})


def test_plateau_at_a_high_lr_and_still_improving() -> None:
    """A flat end with the LR at its peak: decay it; a loss still falling: train longer."""
    metrics = healthy_metrics()
    metrics["loss"] = np.r_[np.linspace(4, 2, 300), np.full(700, 2.0)]
    metrics["lr"] = np.full(STEPS, 3e-4)
    assert found(run_log({0: metrics}))["plateau"].figures["lr_end_share"] == 1.0
    metrics["loss"] = np.linspace(4, 2, STEPS)
    assert "still_improving" in found(run_log({0: metrics}))
