"""Event and clock rules: stalled, run_died, probe_drops, and the sinks' passed-through alarms."""

from __future__ import annotations

import pytest

from agent.alerts.engine import AlertEngine
from tests.agent.alerts.helpers import RUN, make, names


# -- stalled / run_died ----------------------------------------------------------------------------
def _hello(engine: AlertEngine, rank: int = 0, pid: int = 4242) -> None:
    engine.observe_event(RUN, rank, "hello", {"pid": pid})
    engine.observe_event(RUN, rank, "record", {})


def test_stalled_fires_after_silence_and_clears_on_record() -> None:
    """No record for 300 s from a rank fires once; a new record clears the active alert."""
    engine, clock = make(keep=["stalled"])
    _hello(engine, 0)
    _hello(engine, 1)
    clock.advance(299)
    engine.observe_event(RUN, 1, "record", {})
    engine.tick()
    assert engine.take_fired() == []
    clock.advance(1)
    engine.tick()
    engine.tick()
    (alert,) = engine.take_fired()
    assert (alert["rank"], alert["severity"]) == (0, "error")
    assert alert["attrs"]["value"] == pytest.approx(300.0)
    assert engine.active() == [{"name": "stalled", "severity": "error", "run": RUN}]
    engine.observe_event(RUN, 0, "record", {})
    engine.tick()
    assert engine.active() == []


def test_stalled_quiet_after_bye_or_run_end() -> None:
    """A rank that said bye, or a run that ended, is not stalled however quiet."""
    engine, clock = make(keep=["stalled"])
    _hello(engine, 0)
    _hello(engine, 1)
    engine.observe_event(RUN, 0, "bye", {})
    engine.observe_event(RUN, 1, "run_end", {"exit_status": 0})
    engine.observe_event(RUN, 1, "record", {})  # a late straggler of an ended run
    clock.advance(3600)
    engine.tick()
    assert engine.take_fired() == []


def test_stalled_clock_restarts_with_hello() -> None:
    """A rank that says hello again (a restart) is judged from its new first record."""
    engine, clock = make(keep=["stalled"])
    _hello(engine)
    engine.observe_event(RUN, 0, "bye", {})
    clock.advance(1000)
    engine.observe_event(RUN, 0, "hello", {"pid": 1})
    engine.tick()
    clock.advance(299)
    engine.tick()
    assert engine.take_fired() == []
    engine.observe_event(RUN, 0, "record", {})
    clock.advance(300)
    engine.tick()
    assert names(engine) == ["stalled"]


def test_stalled_cooldown() -> None:
    """Stalling again within 1800 s is suppressed; after it, fires again."""
    engine, clock = make(keep=["stalled"])
    _hello(engine)
    clock.advance(300)
    engine.tick()
    engine.observe_event(RUN, 0, "record", {})
    clock.advance(300)
    engine.tick()
    assert names(engine) == ["stalled"] and engine.suppressed() == {"stalled": 1}
    engine.observe_event(RUN, 0, "record", {})
    clock.advance(1800)
    engine.tick()
    assert names(engine) == ["stalled"]


def test_run_died_when_process_gone_without_bye() -> None:
    """process_gone and no bye within the 5 s grace: critical run_died for that rank."""
    engine, clock = make(keep=["run_died"])
    _hello(engine, 2, pid=777)
    engine.observe_event(RUN, -1, "process_gone", {"pid": 777})
    clock.advance(4)
    engine.tick()
    assert engine.take_fired() == []
    clock.advance(1)
    engine.tick()
    (alert,) = engine.take_fired()
    assert (alert["name"], alert["severity"], alert["rank"]) == ("run_died", "critical", 2)
    assert alert["attrs"]["pid"] == 777 and alert["attrs"]["reason"] == "process_gone"
    assert engine.active() == [{"name": "run_died", "severity": "critical", "run": RUN}]
    clock.advance(600)
    assert engine.active() == []


def test_run_died_quiet_when_bye_arrives_within_grace() -> None:
    """The sampler may see the pid vanish before the bye is processed: no alert then."""
    engine, clock = make(keep=["run_died"])
    _hello(engine, 0, pid=99)
    engine.observe_event(RUN, 0, "process_gone", {"pid": 99})
    clock.advance(1)
    engine.observe_event(RUN, 0, "bye", {})
    clock.advance(10)
    engine.tick()
    engine.observe_event(RUN, 0, "run_end", {"exit_status": 0})
    assert engine.take_fired() == []


def test_run_died_on_failed_run_end() -> None:
    """run_end with a non-zero exit status and no bye fires; exit 0, or after bye, does not."""
    engine, _ = make(keep=["run_died"])
    _hello(engine, 0)
    engine.observe_event(RUN, -1, "run_end", {"exit_status": 1})
    (alert,) = engine.take_fired()
    assert alert["attrs"]["exit_status"] == 1 and alert["attrs"]["reason"] == "run_end"
    engine, _ = make(keep=["run_died"])
    _hello(engine, 0)
    engine.observe_event(RUN, -1, "run_end", {"exit_status": 0})
    engine, _ = make(keep=["run_died"])
    _hello(engine, 0)
    engine.observe_event(RUN, 0, "bye", {})
    engine.observe_event(RUN, -1, "run_end", {"exit_status": 137})
    assert engine.take_fired() == []


def test_run_died_cooldown() -> None:
    """Two deaths of the same run/rank within 600 s: one alert, one suppressed."""
    engine, clock = make(keep=["run_died"])
    for _ in range(2):
        _hello(engine, 0)
        engine.observe_event(RUN, 0, "run_end", {"exit_status": 1})
        clock.advance(100)
    assert names(engine) == ["run_died"] and engine.suppressed() == {"run_died": 1}
    clock.advance(600)
    _hello(engine, 0)
    engine.observe_event(RUN, 0, "run_end", {"exit_status": "killed"})
    assert names(engine) == ["run_died"]


# -- probe_drops / sink_failed / series_cap --------------------------------------------------------
def test_probe_drops_fires_on_increase_only() -> None:
    """Cumulative drop counters: fires when one goes up, quiet when unchanged; with cooldown."""
    engine, clock = make(keep=["probe_drops"])
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 0}})
    assert engine.take_fired() == []
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 5, "encode": 0}})
    (alert,) = engine.take_fired()
    assert alert["attrs"]["increase"] == {"queue_full": 5} and alert["attrs"]["value"] == 5
    assert "queue_full +5" in alert["message"]
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 5, "encode": 0}})
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 9}})
    assert engine.take_fired() == [] and engine.suppressed() == {"probe_drops": 1}
    clock.advance(600)
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 10}})
    assert names(engine) == ["probe_drops"]


def test_sink_failed_passes_through_per_sink_with_cooldown() -> None:
    """A sink's failure becomes an error alert to log+store; repeats per sink are held back."""
    engine, clock = make(keep=["sink_failed"])
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "wandb", "message": "401 Unauthorized"})
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "wandb", "message": "401 again"})
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "tensorboard", "message": "disk full"})
    fired = engine.take_fired()
    assert [a["message"] for a in fired] == [
        f"sink wandb failed: 401 Unauthorized (run {RUN})",
        f"sink tensorboard failed: disk full (run {RUN})",
    ]
    assert all(a["destinations"] == ["log", "store"] for a in fired)
    assert engine.suppressed() == {"sink_failed": 1}
    clock.advance(300)
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "wandb", "message": "401"})
    assert names(engine) == ["sink_failed"]


def test_series_cap_passes_the_sink_message() -> None:
    """The Prometheus sink's series-cap alert arrives with its message, once per cooldown."""
    engine, clock = make(keep=["series_cap"])
    attrs = {"name": "prometheus_series_cap", "message": "10000 series exported, the cap"}
    engine.observe_event(RUN, -1, "series_cap", attrs)
    engine.observe_event(RUN, -1, "series_cap", attrs)
    fired = engine.take_fired()
    assert [(a["message"], a["destinations"]) for a in fired] == [
        ("10000 series exported, the cap", ["store"])
    ]
    clock.advance(3600)
    engine.observe_event(RUN, -1, "series_cap", attrs)
    assert names(engine) == ["series_cap"]
