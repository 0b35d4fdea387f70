"""Fan-out from the run store to the configured sinks, each behind its own worker.

The receive loop calls ``submit`` (a deque append per sink). Sink failures
and sink-raised alerts come back through ``take_alerts`` on the receive
loop's thread, so the run store stays single-threaded.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from typing import Any

from agent.analysis.messages import SinkAlarm
from agent.config import AgentConfig
from sinks import registry
from sinks.base import Batch, Sink
from sinks.health import SinkHealth
from sinks.worker import SinkWorker

logger = logging.getLogger("outrider.agent")

FAILURE_ALERT_COOLDOWN = 60.0  # seconds between two sink_failed alerts of one sink


class Fanout:
    """The agent's sinks: building them, feeding them, their health, closing them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.workers: list[SinkWorker] = []
        self.broken: dict[str, str] = {}  # sinks that could not be built, and why
        self.clock = clock
        self._alerts: collections.deque[SinkAlarm] = collections.deque()
        self._last_failure_alert: dict[str, float] = {}

    @classmethod
    def from_config(cls, config: AgentConfig, context: registry.SinkContext) -> Fanout:
        """Build every enabled sink; one that fails to build is reported, not fatal."""
        fanout = cls()
        for name, settings in config.enabled_sinks().items():
            try:
                sink = registry.create(name, settings.options(), context, settings.class_)
            except Exception as exc:  # a taken port, a missing library, a bad directory
                fanout.broken[name] = f"{type(exc).__name__}: {exc}"
                logger.error("outrider agent: sink %s is off: %s", name, fanout.broken[name])
                continue
            fanout.add(sink, queue_size=settings.queue_size, retries=settings.retries)
        return fanout

    def add(self, sink: Sink, **worker_options: Any) -> SinkWorker:
        worker = SinkWorker(sink, on_failure=self._on_failure, **worker_options)
        self.workers.append(worker)
        logger.info("outrider agent: sink %s on", sink.name)
        return worker

    def submit(self, batch: Batch, skip: frozenset[str] = frozenset()) -> None:
        """Hand ``batch`` to every sink but those named in ``skip``."""
        for worker in self.workers:
            if worker.name not in skip:
                worker.submit(batch)

    def submit_between_runs(self, batch: Batch) -> None:
        """A host sample taken while no run is open: only to sinks that take those."""
        for worker in self.workers:
            if worker.sink.between_runs:
                worker.submit(batch)

    def kick(self) -> None:
        """Every sink exports now (the agent's once-a-second beat)."""
        for worker in self.workers:
            worker.kick()

    def wait_prepared(self, timeout: float) -> bool:
        """Wait until every sink's one-off preparation (imports) is done, at most ``timeout``."""
        deadline = self.clock() + timeout
        return all(w.prepared.wait(max(0.0, deadline - self.clock())) for w in self.workers)

    def _on_failure(self, sink: str, batch: Batch, error: BaseException) -> None:
        """Called on a sink's worker thread when a batch is given up on."""
        now = self.clock()
        if (
            now - self._last_failure_alert.get(sink, -FAILURE_ALERT_COOLDOWN)
            < FAILURE_ALERT_COOLDOWN
        ):
            return
        self._last_failure_alert[sink] = now
        alert = {
            "name": "sink_failed",
            "severity": "error",
            "message": f"sink {sink} is failing: {type(error).__name__}: {error}",
            "attrs": {"sink": sink},
        }
        self._alerts.append(SinkAlarm.from_sink(batch.source.run, alert))

    def take_alerts(self) -> list[SinkAlarm]:
        """Alerts the sinks raised since the last call, their own and their workers'."""
        for worker in self.workers:
            try:
                for alert in worker.sink.take_alerts():
                    self._alerts.append(SinkAlarm.from_sink(alert.get("run"), alert))
            except Exception as exc:
                logger.warning("outrider agent: sink %s take_alerts failed: %r", worker.name, exc)
        taken = []
        while self._alerts:
            taken.append(self._alerts.popleft())
        return taken

    def snapshot(self) -> dict[str, SinkHealth]:
        """Each configured sink's health by name, those that could not be built included."""
        sinks = {worker.name: worker.snapshot() for worker in self.workers}
        for name, reason in self.broken.items():
            sinks[name] = SinkHealth.unbuilt(reason)
        return sinks

    def close(self, timeout: float) -> None:
        """Close every sink, in parallel, within ``timeout`` in all."""
        deadline = self.clock() + timeout
        for worker in self.workers:
            worker.begin_close(timeout)
        for worker in self.workers:
            worker.close(max(0.0, deadline - self.clock()))
