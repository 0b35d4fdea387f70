"""The alert engine: cooldown episodes, the alert it fires, log delivery, bounds, rule errors."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytest

from agent.alerts.config import AlertsConfig
from agent.alerts.engine import AlertEngine
from agent.alerts.rules.advice import DEFAULT_ADVICE
from tests.agent.alerts.helpers import RSS, RUN, Clock, make, names


def test_condition_suppressed_by_cooldown_fires_when_cooldown_ends() -> None:
    """An episode that starts within the cooldown and still holds after it is not lost."""
    engine, clock = make(keep=["nonfinite"])
    engine.observe(RUN, 0, 1, clock.now, {"loss": math.nan})
    engine.observe(RUN, 0, 2, clock.now, {"loss": 1.0})
    engine.observe(RUN, 0, 3, clock.now, {"loss": math.nan})
    assert names(engine) == ["nonfinite"]
    clock.advance(301)
    engine.observe(RUN, 0, 4, clock.now, {"loss": math.nan})
    assert names(engine) == ["nonfinite"]


def test_template_rendering_and_alert_shape() -> None:
    """A custom template renders rule fields; the alert dict has every documented key."""
    rule = {
        "type": "threshold",
        "metric": "val/accuracy",
        "below": 0.5,
        "severity": "info",
        "cooldown": 60,
        "message": "{name} [{severity}]: {metric} {value:.2f} < {threshold} on {run}/{rank} "
        "@{step}",
        "destinations": ["log", "sinks"],
    }
    engine, clock = make({"bad_accuracy": rule})
    engine.observe(RUN, 0, 42, clock.now, {"val/accuracy": 0.25})
    (alert,) = engine.take_fired()
    assert alert == {
        "kind": "alert",
        "name": "bad_accuracy",
        "severity": "info",
        "message": f"bad_accuracy [info]: val/accuracy 0.25 < 0.5 on {RUN}/0 @42",
        "advice": DEFAULT_ADVICE["threshold"],
        "run": RUN,
        "rank": 0,
        "step": 42,
        "attrs": {
            "metric": "val/accuracy",
            "value": 0.25,
            "threshold": 0.5,
            "direction": "below",
            "limit": pytest.approx(math.nan, nan_ok=True),
        },
        "destinations": ["log", "sinks"],
    }
    assert engine.counts() == {("bad_accuracy", "info"): 1}


def test_log_destination_level_follows_severity(caplog: pytest.LogCaptureFixture) -> None:
    """The `log` destination writes to logger outrider.alerts at the alert's severity."""
    engine, clock = make(keep=["nonfinite", "probe_drops"], default_destinations=["log"])
    with caplog.at_level(logging.INFO, logger="outrider.alerts"):
        engine.observe(RUN, 0, 1, clock.now, {"loss": math.nan})
        engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 3}})
    levels = [(r.levelno, r.name) for r in caplog.records]
    assert levels == [
        (logging.CRITICAL, "outrider.alerts"),
        (logging.WARNING, "outrider.alerts"),
    ]


# -- bounds and robustness -------------------------------------------------------------------------
def test_state_is_bounded_and_refusals_counted() -> None:
    """Millions of names matching a glob cannot grow the state past max_state_keys."""
    rule = {"type": "zscore", "metric": "layer/*", "warmup": 2}
    engine, clock = make({"layers": rule}, max_state_keys=100)
    for chunk in range(20):
        metrics = {f"layer/{chunk}/{i}": 1.0 for i in range(1000)}
        engine.observe(RUN, 0, chunk, clock.now, metrics)
    stats = engine.stats()
    assert stats["state_keys"] == 100
    assert stats["state_refused"] == 20 * 1000 - 100
    assert len(engine._match_cache) <= 20_000
    for step in range(5):  # the keys it holds keep working
        engine.observe(RUN, 0, 100 + step, clock.now, {"layer/0/0": 1.0 + 0.01 * (step % 2)})
    engine.observe(RUN, 0, 200, clock.now, {"layer/0/0": 1000.0})
    assert names(engine) == ["layers"]


def test_run_end_frees_state() -> None:
    """A run's state is dropped when it ends, so many runs do not accumulate."""
    engine, clock = make(keep=["loss_spike", "memory_leak"])
    for run in range(50):
        engine.observe(f"run-{run}", 0, 1, clock.now, {"loss": 1.0, RSS: 1e9})
        engine.observe_event(f"run-{run}", -1, "run_end", {"exit_status": 0})
    assert engine.stats()["state_keys"] == 0


def test_odd_input_is_skipped() -> None:
    """Non-numeric values, odd steps and times, and non-mapping attrs do not break the engine."""
    engine, _ = make(keep=["nonfinite", "probe_drops", "run_died"])
    odd: Any = {"loss": "oops", "grad_norm": None}
    engine.observe(RUN, 0, "7", "soon", odd)  # type: ignore[arg-type]
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": ["not", "a", "mapping"]})
    engine.observe_event(RUN, 0, "probe_stats", None)  # type: ignore[arg-type]
    engine.observe_event(RUN, 0, "process_gone", {"pid": "x"})
    engine.observe_event(RUN, 0, "mystery", {})
    engine.tick()
    assert engine.stats()["rule_errors"] == 0


def test_rule_errors_are_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside tests (strict=False) a failing rule is counted and the others keep running."""
    config = AlertsConfig.model_validate({"default_destinations": ["store"]})
    engine = AlertEngine(config, clock=Clock())
    spike = next(rule for rule in engine.rules if rule.name == "loss_spike")

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(spike, "on_sample", broken)
    engine.observe(RUN, 0, 1, 1.0, {"loss": math.nan})
    assert names(engine) == ["nonfinite"]
    assert engine.stats()["rule_errors"] == 1


def test_fired_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alerts nobody takes are capped; the oldest go first, counted."""
    monkeypatch.setattr("agent.alerts.engine.MAX_FIRED", 5)
    engine, clock = make({"any": {"type": "threshold", "metric": "m/*", "above": 0, "cooldown": 0}})
    engine.observe(RUN, 0, 1, clock.now, {f"m/{i}": 1.0 for i in range(8)})
    fired = engine.take_fired()
    assert [a["attrs"]["metric"] for a in fired] == [f"m/{i}" for i in range(3, 8)]
    assert engine.stats()["fired_dropped"] == 3


def test_rule_errors_are_logged_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    """A rule failing on every sample logs one line a minute, then says how many it held back."""
    clock = Clock()
    engine = AlertEngine(
        AlertsConfig.model_validate({"default_destinations": ["store"]}), clock=clock
    )
    spike = next(rule for rule in engine.rules if rule.name == "loss_spike")

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    spike.on_sample = broken  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            engine.observe(RUN, 0, 1, clock.now, {"loss": 1.0})
            clock.advance(10)
        clock.advance(60)
        engine.observe(RUN, 0, 2, clock.now, {"loss": 1.0})
    lines = [r.getMessage() for r in caplog.records if "rule 'loss_spike' failed" in r.getMessage()]
    assert len(lines) == 2 and engine.stats()["rule_errors"] == 4
    assert "(2 similar suppressed)" in lines[1] and "4 rule errors so far" in lines[1]
