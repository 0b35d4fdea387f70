"""The per-run cap on metric names tracked in memory (agent/ingest/names.py).

A run that logs more distinct names than ``max_metric_names`` keeps every value in the
run store; the analysis and sinks get the first names only, the rest is counted (run.json
``metric_names``, the agent's ``metric_values_over_cap``) and alerted once per run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from agent.ingest.counters import AgentCounters
from agent.ingest.decode import Record
from agent.ingest.names import EVENT, MetricNameCap
from agent.store.run_store import RunStore
from probe import protocol
from tests.helpers import AgentProcess, Pusher, envelope, lines, pack, run_info, scalars, wait_for

PER_RECORD = protocol.MAX_METRICS_PER_RECORD
MB = 1024 * 1024


def _record(seq: int, metrics: dict[str, Any]) -> Record:
    return Record(protocol.SCALARS, seq, time.time(), seq, metrics)


def test_names_past_the_cap_are_held_back_from_memory_but_stored(tmp_path: Path) -> None:
    """The first ``limit`` names pass; later ones are cut from the sinks' copy only,
    counted, and raise one alarm per run."""
    store = RunStore(tmp_path, "run")
    counters = AgentCounters()
    cap = MetricNameCap(3, counters)
    env = envelope(run="run")
    first = store.add(env, [_record(0, {"a": 1.0, "b": 2.0})], 1)
    assert cap.admit(store, first) is first  # nothing held back: the same list, no copy
    entries = store.add(env, [_record(1, {"a": 1.5, "c": 3.0, "d": 4.0, "e": 5.0})], 1)
    admitted = cap.admit(store, entries)
    assert admitted[0]["metrics"] == {"a": 1.5, "c": 3.0}
    assert entries[0]["metrics"] == {"a": 1.5, "c": 3.0, "d": 4.0, "e": 5.0}
    again = cap.admit(store, store.add(env, [_record(2, {"d": 1.0, "b": 0.5})], 1))
    assert again[0]["metrics"] == {"b": 0.5}
    assert cap.figures("run") == {"tracked": 3, "limit": 3, "values_over_cap": 3}
    assert store.info["metric_names"] == cap.figures("run")
    assert counters.metric_values_over_cap == 3
    alarms = cap.take_alarms()
    assert [(a.run, a.event, a.entry["name"]) for a in alarms] == [("run", EVENT, EVENT)]
    assert cap.take_alarms() == []  # once per run
    store.close()
    stored = [orjson.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open("rb")]
    assert [line["metrics"] for line in stored] == [
        {"a": 1.0, "b": 2.0},
        {"a": 1.5, "c": 3.0, "d": 4.0, "e": 5.0},
        {"d": 1.0, "b": 0.5},
    ]


def _rss(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in (process, *process.children(recursive=True))) / MB


def test_a_run_with_200k_metric_names_keeps_the_agent_bounded(tmp_path: Path) -> None:
    """200k distinct names to a real agent (statistics and alerts on): every value is stored,
    the values past 10,000 names are counted, one too_many_metrics alert, and the agent's
    memory does not grow with the second 100k names (about 5 MB; 27 MB without the cap)."""
    agent = AgentProcess(tmp_path, log_level="WARNING")
    env = envelope(run="names", stream="wide")
    records = 200
    half_rss = 0.0
    try:
        with Pusher(agent.endpoint) as push:
            for r in range(records):
                names = {f"sample_{r * PER_RECORD + i}/loss": float(i) for i in range(PER_RECORD)}
                push.send(pack(env, [scalars(r, r, names)]))
                if r == records // 2 - 1:
                    agent.wait_lines("names", records // 2, 60)
                    half_rss = _rss(agent.process.pid)
            agent.wait_lines("names", records, 60)
        alerts = agent.run_dir("names") / "alerts.jsonl"
        wait_for(lambda: alerts.exists() and alerts.read_bytes(), 30, "a too_many_metrics alert")
        time.sleep(1.5)  # the analysis works through the second half (a tick)
        growth = _rss(agent.process.pid) - half_rss
        assert agent.stop() == 0, agent.stderr()
    finally:
        agent.kill()

    run_dir = agent.run_dir("names")
    stored = lines(run_dir)
    assert sum(len(line["metrics"]) for line in stored) == records * PER_RECORD
    info = run_info(run_dir)
    over = records * PER_RECORD - 10_000
    assert info["metric_names"] == {"tracked": 10_000, "limit": 10_000, "values_over_cap": over}
    assert info["agent"]["metric_values_over_cap"] == over
    fired = [orjson.loads(line) for line in alerts.read_bytes().splitlines()]
    assert [alert["name"] for alert in fired] == ["too_many_metrics"]
    assert "10000 distinct metric names" in fired[0]["message"]
    assert growth < 15, f"the agent grew {growth:.0f} MB over the second 100k names"
