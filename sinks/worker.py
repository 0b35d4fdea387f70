"""One bounded queue and one thread per sink, so no sink can stall another.

The agent's receive loop only ever appends to a deque (O(1), never blocks).
The worker exports in batches, retries failures with exponential backoff,
drops the oldest batches (counted) when its sink falls behind, and reports a
health state. A sink that hangs inside ``export`` blocks only its own thread:
the queue fills, drops are counted, health says ``stalled``.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sinks.base import Batch, Sink
from sinks.health import Health, SinkHealth

logger = logging.getLogger("outrider.sinks")

#: once the agent beats, a worker's own timer waits this many export intervals: it fires
#: only if the beat stops, never just before one (two wake-ups for one export)
FALLBACK_BEATS = 2


@dataclass
class SinkStats:
    exported_batches: int = 0
    exported_entries: int = 0
    failures: int = 0
    retries: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> entries
    last_error: str | None = None
    last_export_seconds: float = 0.0

    def drop(self, reason: str, entries: int) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + entries


FailureCallback = Callable[[str, Batch, BaseException], None]


class SinkWorker:
    """Feeds one sink from a bounded queue on a daemon thread."""

    def __init__(
        self,
        sink: Sink,
        *,
        queue_size: int = 1000,
        max_batches: int = 64,
        retries: int = 3,
        backoff: float = 0.25,
        backoff_max: float = 5.0,
        flush_interval: float = 1.0,
        export_interval: float = 0.25,
        stall_after: float = 30.0,
        on_failure: FailureCallback | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.sink = sink
        self.name = sink.name
        self.queue: collections.deque[Batch] = collections.deque()
        self.queue_size = queue_size
        self.max_batches = max_batches
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.flush_interval = flush_interval
        # Most seconds a queued batch waits (unless max_batches are queued): the worker
        # wakes this often, and every wake-up on a shared core is taken from the trainer.
        # Once the agent beats (kick), its beat sets the pace and this is only a fallback.
        self.export_interval = min(export_interval, flush_interval)
        self._beaten = False
        # A sink may know better how long one call can legitimately take (W&B's init).
        self.stall_after = max(stall_after, sink.stall_after)
        self._close_budget = 5.0
        self.on_failure = on_failure
        self.clock = clock
        self.stats = SinkStats()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._state = Health.OK
        self._busy_since: float | None = None
        self._in_flight = 0  # entries handed to an export that has not returned
        self.prepared = threading.Event()  # set once the sink's prepare() has returned
        self._thread = threading.Thread(
            target=self._run, name=f"outrider-sink-{self.name}", daemon=True
        )
        self._thread.start()

    # -- agent side ------------------------------------------------------------
    def submit(self, batch: Batch) -> None:
        """Queue a batch; when full, the oldest batch is dropped and counted."""
        with self._lock:
            if len(self.queue) >= self.queue_size:
                oldest = self.queue.popleft()
                self.stats.drop("queue_full", len(oldest.entries))
            self.queue.append(batch)
        if len(self.queue) >= self.max_batches:
            self._wake.set()

    def kick(self) -> None:
        """The agent's beat: export now, in step with the other sinks and the agent.

        One burst of work a second, instead of one per sink at its own phase: a
        core woken from idle is slow for its first milliseconds, so wake-ups that
        come together cost far less than the same wake-ups spread out.
        """
        self._beaten = True
        self._wake.set()

    @property
    def health(self) -> Health:
        busy = self._busy_since
        if busy is not None and self.clock() - busy > self.stall_after:
            return Health.STALLED
        return self._state

    def snapshot(self) -> SinkHealth:
        """The sink's health now (safe from any thread)."""
        sink_counters = self._sink_counters()  # outside the lock: a sink may block
        with self._lock:
            return SinkHealth(
                health=self.health,
                queue_depth=len(self.queue),
                exported_batches=self.stats.exported_batches,
                exported_entries=self.stats.exported_entries,
                failures=self.stats.failures,
                retries=self.stats.retries,
                dropped=dict(self.stats.dropped),
                last_error=self.stats.last_error,
                counters=sink_counters,
            )

    def _sink_counters(self) -> dict[str, int]:
        try:
            return dict(self.sink.counters())
        except Exception:  # a sink's bookkeeping must not break the agent's
            return {"counters_error": 1}

    def begin_close(self, timeout: float = 5.0) -> None:
        """Ask the worker to finish up without waiting (closing many sinks in parallel)."""
        self._close_budget = timeout
        self._stop.set()
        self._wake.set()

    def close(self, timeout: float) -> bool:
        """Export what is queued, flush and close the sink; False if it did not finish in time.

        A sink that does not finish is abandoned (its thread is a daemon) and
        what it still held is counted as dropped.
        """
        if not self._stop.is_set():
            self.begin_close(timeout)
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._lock:
                pending = sum(len(b.entries) for b in self.queue) + self._in_flight
                self.queue.clear()
                self.stats.drop("shutdown", pending)
            logger.warning(
                "outrider sink %s: did not close within %.1f s; abandoned", self.name, timeout
            )
            return False
        return True

    # -- worker thread -----------------------------------------------------------
    def _run(self) -> None:
        error = self._call(self.sink.prepare)
        self.prepared.set()
        if error is not None:
            logger.warning(
                "outrider sink %s: prepare failed: %s: %s", self.name, type(error).__name__, error
            )
        last_flush = self.clock()
        while True:
            self._wake.wait(self.export_interval * (FALLBACK_BEATS if self._beaten else 1))
            self._wake.clear()
            stopping = self._stop.is_set()
            while self.queue:
                self._export_some()
            now = self.clock()
            # A tenth of slack: a flush due every beat must not slip to every other one.
            if stopping or now - last_flush >= 0.9 * self.flush_interval:
                last_flush = now
                error = self._call(self.sink.flush, self.flush_interval * 5)
                if error is not None:
                    self.stats.failures += 1
                    self.stats.last_error = f"flush: {type(error).__name__}: {error}"
            if stopping:
                break
        self._call(self.sink.close, self._close_budget)
        if self._state is Health.OK:
            self._state = Health.CLOSED  # a failing sink keeps saying so

    def _export_some(self) -> None:
        with self._lock:
            batches = [self.queue.popleft() for _ in range(min(self.max_batches, len(self.queue)))]
        if not batches:
            return
        entries = sum(len(b.entries) for b in batches)
        self._in_flight = entries
        try:
            self._export_with_retries(batches, entries)
        finally:
            self._in_flight = 0

    def _export_with_retries(self, batches: list[Batch], entries: int) -> None:
        delay = self.backoff
        for attempt in range(self.retries + 1):
            started = self.clock()
            error = self._call(self.sink.export, batches)
            if error is None:
                self.stats.exported_batches += len(batches)
                self.stats.exported_entries += entries
                self.stats.last_export_seconds = self.clock() - started
                self._state = Health.OK
                return
            self.stats.failures += 1
            self.stats.last_error = f"{type(error).__name__}: {error}"
            if attempt < self.retries and not self._stop.is_set():
                self.stats.retries += 1
                self._state = Health.RETRYING
                self._stop.wait(delay)
                delay = min(delay * 2, self.backoff_max)
        self._state = Health.FAILING
        with self._lock:  # the receive loop counts queue_full drops concurrently
            self.stats.drop("export_failed", entries)
        logger.warning(
            "outrider sink %s: export failed after %d attempts (%s); %d entries dropped",
            self.name,
            self.retries + 1,
            self.stats.last_error,
            entries,
        )
        if self.on_failure is not None:
            self.on_failure(self.name, batches[0], error)  # type: ignore[arg-type]

    def _call(self, method: Callable[..., Any], *args: Any) -> BaseException | None:
        """Run a sink method, timing it for stall detection; the exception is returned."""
        self._busy_since = self.clock()
        try:
            method(*args)
        except Exception as exc:
            return exc
        finally:
            self._busy_since = None
        return None
