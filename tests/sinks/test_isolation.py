"""A sink that raises or hangs never stalls the agent or another sink."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from sinks.base import Batch, Source
from sinks.health import Health
from sinks.memory import MemorySink
from sinks.worker import SinkWorker
from tests.faulty_sinks import HangingSink, RaisingSink
from tests.helpers import (
    lines,
    run_info,
    run_trainer,
    short_ipc_endpoint,
    start_agent,
    stop_agent,
    wait_for,
)

SOURCE = Source("run", "stream", 0, 0, 1, "host", 1)


def batch(n: int = 10) -> Batch:
    entries = [
        {"kind": "scalars", "step": i, "rank": 0, "t": 0.0, "metrics": {"loss": 1.0}}
        for i in range(n)
    ]
    return Batch(SOURCE, entries, "/tmp")


def test_raising_sink_retries_then_drops_and_reports() -> None:
    """Export failures are retried with backoff, then dropped, counted, and reported once."""
    failures: list[tuple[str, BaseException]] = []
    worker = SinkWorker(
        RaisingSink(),
        retries=2,
        backoff=0.01,
        on_failure=lambda name, b, e: failures.append((name, e)),
    )
    worker.submit(batch(10))
    # The failure callback comes last, after the drop is counted and logged.
    wait_for(lambda: failures, 5, "the batch to be given up and reported")
    assert worker.stats.dropped == {"export_failed": 10}
    assert worker.stats.failures == 3 and worker.stats.retries == 2
    assert worker.health is Health.FAILING
    assert [name for name, _ in failures] == ["raising"]
    assert "collector is down" in (worker.stats.last_error or "")
    assert worker.close(2.0)


def test_the_agents_kick_exports_at_once() -> None:
    """kick() (the agent's beat) exports what is queued now, not at the worker's own interval."""
    sink = MemorySink()
    worker = SinkWorker(sink, export_interval=60.0, flush_interval=60.0)
    wait_for(worker.prepared.is_set, 5, "the sink to be prepared")
    worker.submit(batch(3))
    worker.kick()
    wait_for(lambda: len(sink.entries()) == 3, 5, "the kicked export (its own timer is 60 s)")
    assert worker.close(2.0)


def test_hanging_sink_fills_its_own_queue_only() -> None:
    """A wedged export: submits stay O(1), old batches are dropped and counted, others flow."""
    hanging, healthy = HangingSink(), MemorySink()
    stuck = SinkWorker(hanging, queue_size=5, stall_after=0.2)
    fine = SinkWorker(healthy)
    started = time.monotonic()
    for _ in range(100):
        stuck.submit(batch(10))
        fine.submit(batch(10))
    assert time.monotonic() - started < 2.0, "submit blocked on a hanging sink"
    assert hanging.entered.wait(5)
    wait_for(lambda: len(healthy.entries()) == 1000, 5, "the healthy sink to get everything")
    wait_for(lambda: stuck.health is Health.STALLED, 5, "the hanging sink to be reported stalled")
    assert stuck.stats.dropped["queue_full"] >= 900
    started = time.monotonic()
    assert not stuck.close(0.3), "a hanging sink cannot close cleanly"
    assert time.monotonic() - started < 2.0
    assert stuck.snapshot().dropped["shutdown"] > 0
    assert fine.close(2.0) and healthy.closed
    hanging.release.set()


def test_recovering_sink_gets_the_batch_on_retry() -> None:
    """A transient failure costs a retry, not data."""

    class Flaky(MemorySink):
        attempts = 0

        def export(self, batches):  # type: ignore[no-untyped-def]
            self.attempts += 1
            if self.attempts == 1:
                raise OSError("disk full, for a moment")
            super().export(batches)

    sink = Flaky()
    worker = SinkWorker(sink, backoff=0.01)
    worker.submit(batch(7))
    wait_for(lambda: len(sink.entries()) == 7, 5, "the retried batch")
    assert worker.stats.retries == 1 and worker.stats.dropped == {}
    assert worker.health is Health.OK
    worker.close(2.0)


FAULTY_CONFIG = """\
sink_close_timeout: 2
sinks:
  tensorboard: {flush_secs: 1}
  prometheus: {enabled: false}
  wandb: {enabled: false}
  raising: {class: "tests.faulty_sinks:RaisingSink", retries: 1}
  hanging: {class: "tests.faulty_sinks:HangingSink", queue_size: 4}
"""

TRAINER = """
import probe
probe.init()
for step in range(2000):
    probe.log({"loss": 1.0 / (step + 1)}, step=step)
"""


@pytest.mark.slow
def test_agent_with_broken_sinks_keeps_everything(tmp_path: Path) -> None:
    """In a real agent: a raising and a hanging sink; run store and TensorBoard get everything."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = tmp_path / "agent.yaml"
    config.write_text(FAULTY_CONFIG)
    endpoint = short_ipc_endpoint()
    runs = tmp_path / "runs"
    agent = start_agent(endpoint, runs, "--config", str(config), sinks=None)
    result = run_trainer(TRAINER, endpoint, "faulty")
    assert result.returncode == 0, result.stderr
    run_dir = runs / "faulty"
    wait_for(lambda: len(lines(run_dir)) >= 2000, 10, "records in the store")
    started = time.monotonic()
    assert stop_agent(agent, timeout=60) == 0
    assert time.monotonic() - started < 15, "a hanging sink held the agent's exit"
    stored = lines(run_dir, agent_lines=True)
    assert sum(line["kind"] == "scalars" and line["stream"] != "agent" for line in stored) == 2000
    alerts = [line for line in stored if line["kind"] == "alert"]
    assert any(a["name"] == "sink_failed" and "raising" in a["message"] for a in alerts)
    sinks = run_info(run_dir)["agent"]["sinks"]
    assert sinks["raising"]["health"] == "failing"
    assert sinks["raising"]["dropped"].get("export_failed", 0) > 0
    assert sinks["hanging"]["health"] in ("stalled", "retrying", "ok")
    assert sum(sinks["hanging"]["dropped"].values()) > 0
    assert sinks["tensorboard"]["health"] == "closed"
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert len(events.Scalars("loss")) == 2000
