"""The agent's health snapshot: built from real counters, workers and analysis figures, and
stored in run.json in the same shape, key for key and byte for byte, as before it was typed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.fanout import Fanout
from agent.health import agent_health
from agent.ingest.accounting import StreamLedger
from agent.ingest.counters import AgentCounters
from agent.store.run_store import RunStore
from sinks.base import Batch, Source
from sinks.health import (
    ActiveAlert,
    AgentHealth,
    AnalysisHealth,
    FiredAlert,
    Health,
    JobCost,
    SinkHealth,
)
from sinks.memory import MemorySink
from tests.faulty_sinks import RaisingSink

SOURCE = Source("run-1", "stream-0", 0, 0, 1, "node-a", 4242)
ENGINE = {"rule_errors": 0, "suppressed": 2, "state_keys": 5, "webhooks": {"hook": {"sent": 1}}}
ACTIVE = [{"name": "loss_spike", "severity": "warning", "run": "run-1"}]
FIRED = [{"name": "loss_spike", "severity": "warning", "count": 3}]


COST = JobCost(count=4, seconds_sum=0.5, seconds_max=0.25, last_seconds=0.125,
               cpu_seconds_sum=0.0, superseded=0, failed=0)  # fmt: skip
STORED_COST = {
    "count": 4, "seconds_sum": 0.5, "seconds_max": 0.25, "last_seconds": 0.125,
    "cpu_seconds_sum": 0.0, "superseded": 0, "failed": 0,
}  # fmt: skip

#: Analysis.stats() before the alert engine first reports, after it does, and after a close
#: when it never had (only its own figures); each with run.json's ``agent`` keys for it
ANALYSIS_STATS = {
    "before_alerts": (
        AnalysisHealth({"effective_rank": COST}, 0),
        {"stat_jobs": {"effective_rank": STORED_COST}, "analysis_dropped": 0},
    ),
    "alerts": (
        AnalysisHealth(
            {"effective_rank": COST},
            7,
            ENGINE,
            (ActiveAlert("loss_spike", "warning", "run-1"),),
            (FiredAlert("loss_spike", "warning", 3),),
        ),
        {
            "alert_engine": ENGINE,
            "alerts_active": ACTIVE,
            "alerts_fired": FIRED,
            "stat_jobs": {"effective_rank": STORED_COST},
            "analysis_dropped": 7,
        },
    ),
    "closed_quiet": (
        AnalysisHealth({}, 0, ENGINE),
        {"alert_engine": ENGINE, "stat_jobs": {}, "analysis_dropped": 0},
    ),
}


def counters() -> AgentCounters:
    counted = AgentCounters(messages=12, records=340, bytes=65536)
    counted.reject(counted.rejected_messages, "malformed", 2)
    counted.reject(counted.rejected_records, "bad_record")
    return counted


@pytest.fixture
def fanout() -> Any:
    """A sink that exported a batch and closed, one that failed it, and one never built."""
    made = Fanout()
    made.add(MemorySink())
    made.add(RaisingSink(), retries=0, backoff=0.01)
    made.broken["wandb"] = "ImportError: the wandb sink needs the wandb package"
    made.submit(Batch(SOURCE, [{"kind": "scalars", "step": 1, "metrics": {"loss": 1.0}}], "/x"))
    made.close(5.0)
    return made


#: run.json's ``agent.sinks`` for the fanout above, in the order its keys were always written
STORED_SINKS = {
    "memory": {
        "health": "closed",
        "queue_depth": 0,
        "exported_batches": 1,
        "exported_entries": 1,
        "failures": 0,
        "retries": 0,
        "dropped": {},
        "last_error": None,
        "sink": {},
    },
    "raising": {
        "health": "failing",
        "queue_depth": 0,
        "exported_batches": 0,
        "exported_entries": 0,
        "failures": 1,
        "retries": 0,
        "dropped": {"export_failed": 1},
        "last_error": "ConnectionError: the collector is down",
        "sink": {},
    },
    "wandb": {
        "health": "failing",
        "queue_depth": 0,
        "exported_entries": 0,
        "failures": 1,
        "retries": 0,
        "dropped": {},
        "last_error": "ImportError: the wandb sink needs the wandb package",
    },
}


@pytest.mark.parametrize("analysis", [None, *ANALYSIS_STATS], ids=str)
def test_run_json_keeps_its_shape_byte_for_byte(fanout: Fanout, analysis: str | None) -> None:
    """as_dict() is the counters, then the sinks, then the analysis's figures: the bytes
    run.json gets are those the untyped dicts made, key for key and in order."""
    stats, stored = ANALYSIS_STATS[analysis] if analysis is not None else (None, {})
    health = agent_health(counters(), fanout, stats)
    expected = {**counters().as_dict(), "sinks": STORED_SINKS, **stored}
    option = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS
    assert orjson.dumps(health.as_dict(), option=option) == orjson.dumps(expected, option=option)


def test_the_snapshot_is_typed_for_its_readers(fanout: Fanout) -> None:
    """Sinks read fields, not keys: health as the enum, alerts and job costs as records."""
    health = agent_health(counters(), fanout, ANALYSIS_STATS["alerts"][0])
    assert health.rejected_messages == {"malformed": 2}
    assert health.sinks["memory"].health is Health.CLOSED and not health.sinks["memory"].up
    assert health.sinks["wandb"] == SinkHealth.unbuilt(STORED_SINKS["wandb"]["last_error"])
    assert health.sinks["wandb"].exported_batches is None
    assert health.analysis is not None
    assert health.analysis.stat_jobs["effective_rank"].count == 4
    assert health.analysis.stat_jobs["effective_rank"].seconds_sum == 0.5
    assert [(a.name, a.run) for a in health.analysis.alerts_active or ()] == [
        ("loss_spike", "run-1")
    ]
    assert [(a.name, a.count) for a in health.analysis.alerts_fired or ()] == [("loss_spike", 3)]
    assert health.analysis.dropped_batches == 7
    assert health.runs is None  # run.json records its streams itself


def test_streams_come_from_the_run_stores_ledgers(tmp_path: Path) -> None:
    """Each open run's streams, with what they sent, received, dropped and lost."""
    store = RunStore(tmp_path, "run-1")
    try:
        envelope = {
            "v": 1, "run": "run-1", "stream": "stream-0", "rank": 0, "local_rank": 0,
            "world_size": 1, "host": "node-a", "pid": 4242,
        }  # fmt: skip
        ledger = store.streams["stream-0"] = StreamLedger.from_envelope(envelope)
        ledger.received, ledger.max_seq, ledger.dropped = 8, 11, {"queue_full": 3}
        health = agent_health(counters(), runs=[("run-1", store)])
    finally:
        store.close()
    assert isinstance(health, AgentHealth) and health.sinks == {}
    [stream] = (health.runs or {})["run-1"]
    assert (stream.stream, stream.rank, stream.host) == ("stream-0", 0, "node-a")
    assert (stream.sent, stream.received, stream.dropped, stream.lost) == (
        12,
        8,
        {"queue_full": 3},
        1,
    )
    assert not stream.complete
