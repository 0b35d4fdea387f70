"""checkpoint_missing on a hand-driven engine: the trainer's declared cadence, the configured
one, failed saves, time, and what does not fire (on time, another node's ranks, a quiet run)."""

from __future__ import annotations

from typing import Any

import pytest

from agent.alerts.engine import AlertEngine
from tests.agent.alerts.helpers import RUN, Clock, make


def steps(engine: AlertEngine, clock: Clock, first: int, last: int, rank: int = 0) -> None:
    """Scalars for steps first..last, one every 0.1 s, each a record; a tick every 10 steps."""
    for step in range(first, last + 1):
        clock.advance(0.1)
        engine.observe(RUN, rank, step, clock.now, {"loss": 1.0})
        engine.observe_event(RUN, rank, "record", {})
        if step % 10 == 0:
            engine.tick()


def save(engine: AlertEngine, step: int, rank: int = 0, **cadence: Any) -> str:
    path = f"/ckpts/ckpt-{step}.pt"
    engine.observe_event(RUN, rank, "checkpoint", {"path": path, "step": step, **cadence})
    return path


def missing(engine: AlertEngine) -> list[dict[str, Any]]:
    return [a for a in engine.take_fired() if a["name"] == "checkpoint_missing"]


def test_a_declared_cadence_fires_once_when_saves_stop() -> None:
    """Saves every 100 steps then none: one warning past 150 steps after the last, held
    while the gap grows, ended by the next save."""
    engine, clock = make(keep=["checkpoint_missing"])
    engine.observe_event(RUN, 0, "hello", {"pid": 1})
    for step in range(0, 300, 100):
        steps(engine, clock, step, step + 99)
        save(engine, step + 99, every_steps=100)
    assert missing(engine) == []
    steps(engine, clock, 300, 449)
    assert missing(engine) == []  # 150 steps past step 299: not yet more than 1.5x
    steps(engine, clock, 450, 900)
    (alert,) = missing(engine)
    assert alert["severity"] == "warning" and alert["rank"] == 0
    assert alert["attrs"]["threshold"] == 150 and alert["attrs"]["unit"] == "steps"
    assert "last good: step 299 (ckpt-299.pt)" in alert["message"]
    assert "declared by the trainer" in alert["message"]
    assert alert["advice"]
    assert engine.active() == [{"name": "checkpoint_missing", "severity": "warning", "run": RUN}]
    save(engine, 901, every_steps=100)
    engine.tick()
    assert engine.active() == []


def test_a_failed_save_does_not_count() -> None:
    """A save that fails the agent's check leaves the previous good one as the baseline."""
    engine, clock = make(keep=["checkpoint_missing"])
    steps(engine, clock, 0, 100)
    save(engine, 100, every_steps=100)
    steps(engine, clock, 101, 200)
    engine.observe_event(RUN, 0, "checkpoint_failed", {"path": save(engine, 200)})
    steps(engine, clock, 201, 260)
    (alert,) = missing(engine)
    assert "last good: step 100" in alert["message"]
    assert "1 save since failed the check" in alert["message"]


def test_the_configured_cadence_judges_runs_whose_rank_zero_is_here() -> None:
    """every_steps in the config: a run that never saves fires; ranks of another node (no
    rank 0 here) do not, until one of them saves."""
    engine, clock = make({"checkpoint_missing": {"every_steps": 50}}, keep=["checkpoint_missing"])
    steps(engine, clock, 0, 100, rank=3)
    assert missing(engine) == []
    steps(engine, clock, 0, 100, rank=0)
    (alert,) = missing(engine)
    assert "none since the run started (step 0)" in alert["message"]
    assert "as configured" in alert["message"]


def test_seconds_count_only_while_records_arrive() -> None:
    """every_seconds: a run that keeps logging fires; one that went quiet is stalled's."""
    engine, clock = make(keep=["checkpoint_missing"])
    steps(engine, clock, 0, 10)
    save(engine, 10, every_seconds=60)
    clock.advance(600)
    engine.tick()
    assert missing(engine) == []
    steps(engine, clock, 11, 20)
    (alert,) = missing(engine)
    assert alert["attrs"]["unit"] == "seconds" and alert["attrs"]["threshold"] == 90


@pytest.mark.parametrize("ending", ["bye", "run_end"])
def test_a_finished_run_is_not_missing_saves(ending: str) -> None:
    """After bye or run_end nothing is judged, however long ago the last save was."""
    engine, clock = make(keep=["checkpoint_missing"])
    steps(engine, clock, 0, 10)
    save(engine, 10, every_steps=10)
    steps(engine, clock, 11, 29)  # overdue at step 26, after the last tick (step 20)
    engine.observe_event(RUN, 0, ending, {"exit_status": 0})
    clock.advance(3600)
    engine.tick()
    assert missing(engine) == []
