"""The agent process: wires the rooms together and runs the receive loop.

One thread receives (agent.ingest), stores (agent.store) and fans out to the
sinks (agent.fanout); the analysis (agent.analysis) runs on its own thread
and hands back what it made, which this loop stores and sends like any
record. This module owns the loop's pace (bursts, a once-a-second beat), the
signals, the orphan check and the bounded shutdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from agent.aggregation.forwarding import Forwarder
from agent.analysis.engine import Analysis, Derived
from agent.analysis.messages import SinkAlarm
from agent.config import AgentConfig
from agent.fanout import Fanout
from agent.health import agent_health, read_retrying
from agent.ingest.counters import AgentCounters
from agent.ingest.decode import Record, Rejected, decode
from agent.ingest.names import MetricNameCap
from agent.ingest.receiver import Receiver
from agent.store.registry import MAX_OPEN_RUNS, OpenRuns
from agent.store.run_store import RunStore
from agent.threadnames import ThreadNamer
from probe import protocol
from probe.identity import host_name
from sinks import schema
from sinks.base import Batch, Source
from sinks.health import AgentHealth
from sinks.ratelimit import RateLimitedLog
from sinks.registry import SinkContext

logger = logging.getLogger("outrider.agent")

#: the receive loop's beat: run.json rewrites of a changing run, sink alerts, the parent
#: check and the sinks' exports (kicked together), once a second
BEAT_SECONDS = 1.0
#: a wake-up this far into a beat (the analysis's output, once a second) does the beat early
EARLY_BEAT = 0.5
#: most seconds the agent waits, before it says it is ready, for its one-off start-up work
#: (statistics worker processes, W&B's imports); `outrider run` starts the trainer after it
WARM_SECONDS = 5.0


def yield_cpu_to_the_trainer(nice: int, blas_threads: int) -> None:
    """Run below the trainer: raise this process's niceness, cap BLAS/OpenMP threads,
    and give W&B's service (a Go program) one scheduler thread.

    Children (W&B's service) inherit the niceness and the environment. A numpy
    call in a statistic would otherwise start one BLAS thread per core, each
    competing with torch. The Go runtime keeps one scheduler per core and lets
    idle ones spin looking for work; W&B's service writes a few rows a second,
    and with one scheduler it uses less CPU (about 15% less on a 2-core
    machine). A GOMAXPROCS the user set is kept.
    """
    os.environ.setdefault("GOMAXPROCS", "1")
    if nice > 0:
        try:
            os.nice(nice)
        except OSError as exc:
            logger.warning("outrider agent: cannot lower its priority: %s", exc)
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=blas_threads)


class Agent:
    """Binds the endpoint and writes every accepted record to the run store."""

    def __init__(
        self,
        endpoint: str,
        runs_dir: Path,
        *,
        run_id: str | None = None,
        meta: dict[str, Any] | None = None,
        drain_timeout: float = 5.0,
        parent_pid: int | None = None,
        orphan_idle: float = 60.0,
        config: AgentConfig | None = None,
        fanout: Fanout | None = None,
        sink_close_timeout: float | None = None,
        analysis: bool | None = None,
        host: str | None = None,
        forwarder: Forwarder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or AgentConfig()
        self.sink_close_timeout = (
            self.config.sink_close_timeout if sink_close_timeout is None else sink_close_timeout
        )
        self.runs_dir = runs_dir
        self.drain_timeout = drain_timeout
        self.parent_pid = parent_pid
        self.orphan_idle = orphan_idle
        self._orphaned = False
        self._last_receive = clock()
        self.clock = clock
        self._host = host or host_name()
        #: the job tier: what this node sends up to the job aggregator (None: not forwarding)
        self.forwarder = forwarder
        self.counters = AgentCounters()
        self.complaints = RateLimitedLog(clock=clock)
        self.metric_names = MetricNameCap(self.config.max_metric_names, self.counters)
        self.runs = OpenRuns(
            runs_dir, declared_run=run_id, meta=meta, histogram_bins=self.config.histogram_bins
        )
        self._stop_requested = False
        self._closing = False
        self._signals = 0
        self.receiver = Receiver(endpoint, clock)
        self._previous_wakeup_fd: int | None = None  # while serve() has the signals
        if fanout is None:
            # No config: the run store alone (what tests and embedders want by default).
            context = SinkContext(runs_dir, agent_stats=self.stats)
            fanout = Fanout.from_config(config, context) if config is not None else Fanout()
        self.fanout = fanout
        # Statistics, system samples and alerts: on with a config (the CLI), off without.
        if analysis is None:
            wanted = self.config.stats.enabled or self.config.system.enabled
            analysis = config is not None and (wanted or self.config.alerts.enabled)
        self.analysis = (
            Analysis(self.config, host=self._host, on_output=self.wake) if analysis else None
        )
        self._burst: list[Batch] = []
        self._name_threads = ThreadNamer()

    # -- receiving ---------------------------------------------------------------
    def ingest(self, raw: bytes) -> None:
        """Decode one message and store its good records; count everything else."""
        counters = self.counters
        counters.messages += 1
        counters.bytes += len(raw)
        try:
            message = decode(raw)
        except Rejected as rejected:
            counters.reject(counters.rejected_messages, rejected.reason)
            self.complaints.warning(
                rejected.reason, "outrider agent: rejected a message (%s)", rejected
            )
            return
        for reason, detail in message.rejected:
            counters.reject(counters.rejected_records, reason)
            self.complaints.warning(
                f"record:{reason}", "outrider agent: rejected a record (%s: %s)", reason, detail
            )
        if not message.records:
            return
        run_id = message.envelope["run"]
        store = self.runs.open(run_id)
        if store is None:
            counters.reject(counters.rejected_messages, "too_many_runs")
            self.complaints.warning(
                "too_many_runs",
                "outrider agent: more than %d runs open; records of run %s rejected",
                MAX_OPEN_RUNS,
                run_id,
            )
            return
        first = message.records[0]
        if isinstance(first, Record) and first.kind == protocol.HELLO and "cwd" in first.body:
            self.runs.learn_cwd(store, first.body)
        entries = store.add(message.envelope, message.records, message.count)
        counters.records += message.count
        if self.forwarder is not None:
            self.forwarder.records(store, message.envelope, message.records, entries)
        if self.fanout.workers or self.analysis is not None:
            entries = self.metric_names.admit(store, entries)
            stored = Batch(Source.from_envelope(message.envelope), entries, str(store.dir))
            self.fanout.submit(stored)
            if self.analysis is not None:
                self._burst.append(stored)

    def wake(self) -> None:
        """Wake the receive loop from another thread (safe from any thread)."""
        self.receiver.wake()

    def receive_burst(self, timeout_ms: int) -> int:
        """Wait up to ``timeout_ms`` for input or a wake-up, then drain one burst."""
        if not self.receiver.wait(timeout_ms):
            return 0
        count = 0
        for raw in self.receiver.burst():
            count += 1
            try:
                self.ingest(raw)
            except Exception as exc:  # a bug of ours must not end the agent
                self.counters.reject(self.counters.rejected_messages, "internal_error")
                self.complaints.warning(
                    "internal_error", "outrider agent: internal error on a message: %r", exc
                )
        refused = self.runs.flush()
        if self._burst and self.analysis is not None:
            # After the flush: statistics read features back from tensors.bin.
            burst = _stored_tensors_only(self._burst, refused) if refused else self._burst
            self.analysis.submit(burst)
            self._burst = []
        return count

    def _wait_warm(self, timeout: float) -> None:
        """Let the start-up work finish before the trainer starts: on a machine the trainer
        keeps busy, the same work done later would come out of its first training steps."""
        deadline = self.clock() + timeout
        warm = self.fanout.wait_prepared(timeout)
        if self.analysis is not None:
            warm = self.analysis.wait_warm(max(0.0, deadline - self.clock())) and warm
        if not warm:
            logger.info("outrider agent: start-up work still going after %.0f s", timeout)

    def serve(self, ready: Callable[[], None] | None = None) -> int:
        """Run until a signal; returns the process exit status."""
        with contextlib.suppress(OSError):  # an unwritable runs dir is the run stores' to count
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        # A file size limit (ulimit -f) makes a write fail with EFBIG instead of killing us.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        self.runs.open_declared()
        previous = self._install_signals()
        if self.analysis is not None:
            self.analysis.start()
        try:
            self._wait_warm(WARM_SECONDS)
            self._name_threads()
            if ready is not None:
                ready()
            last_beat = self.clock()
            while not self._stop_requested:
                wait = last_beat + BEAT_SECONDS - self.clock()
                if self.receive_burst(max(0, int(wait * 1000) + 1)):
                    self._last_receive = self.clock()
                derived = self._route_derived()
                now = self.clock()
                since = now - last_beat
                if since >= BEAT_SECONDS or (derived and since >= EARLY_BEAT * BEAT_SECONDS):
                    last_beat = now
                    self._beat(now)
            self._drain()
        finally:
            self.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            previous_fd, self._previous_wakeup_fd = self._previous_wakeup_fd, None
            signal.set_wakeup_fd(-1 if previous_fd is None else previous_fd)
            self.receiver.close_wake_pipe()
        return 0

    def _beat(self, now: float) -> None:
        """Once a second, in one burst with the analysis's output: a core woken from idle
        is slow for its first milliseconds, so periodic work is done together."""
        self._route_alerts()
        self.runs.write_changed_info()
        if self.forwarder is not None:
            self.forwarder.beat(self.runs)
        self._check_parent(now)
        self.fanout.kick()
        self._name_threads()  # after the kick: a sink's first export starts its library's

    def _route_alerts(self) -> None:
        """Alerts from sinks (a failing sink, a series cap), run stores (store_failed) and
        ingest (too many metric names): through the alert rules' cooldowns and destinations
        when the analysis runs, else stored and sent to every sink."""
        alarms = self.fanout.take_alerts()
        alarms += [SinkAlarm.from_sink(run, alert) for run, alert in self.runs.take_alarms()]
        alarms += self.metric_names.take_alarms()
        for alert in alarms:
            if self.analysis is not None and not self._closing:
                self.analysis.sink_alert(alert)
                continue
            entry = alert.entry
            logger.warning("outrider agent: alert %s: %s", entry.get("name"), entry.get("message"))
            self._store_and_send(Derived(alert.run, entry))

    def _route_derived(self) -> int:
        """What the analysis made (derived scalars, summaries, images, system samples,
        alerts): stored like records, then sent to the sinks. Returns how many."""
        if self.analysis is None:
            return 0
        derived = self.analysis.take()
        for item in derived:
            self._store_and_send(item)
        return len(derived)

    def _store_and_send(self, item: Derived) -> None:
        if item.run is None and not item.to_store and item.entry.get("kind") == schema.SYSTEM:
            # no run open: the host sample goes to the sinks that show hosts between runs
            source = Source("", schema.AGENT_STREAM, -1, -1, 0, self._host, os.getpid())
            self.fanout.submit_between_runs(Batch(source, [item.entry], ""))
            return
        if not item.run:  # no particular run (a sink failing on a system sample)
            targets = list(self.runs) if item.to_store else []
        else:
            store = self.runs.get(item.run)
            targets = [store] if store is not None else []
        is_alert = item.entry.get("kind") == schema.ALERT
        for store in targets:
            if is_alert:
                entry = store.add_alert(item.entry) if item.to_store else dict(item.entry)
            else:
                entry = store.add_local(item.entry)
            store.flush()
            if self.forwarder is not None and item.to_store:
                self.forwarder.derived(store, entry)
            if item.to_sinks:
                rank = entry.get("rank", -1)
                source = Source(
                    store.run_id, schema.AGENT_STREAM, rank, -1, 0, self._host, os.getpid()
                )
                self.fanout.submit(Batch(source, [entry], str(store.dir)))

    def stats(self) -> AgentHealth:
        """The agent's health, as the Prometheus sink exposes it (safe from other threads)."""

        def build() -> AgentHealth:
            analysis = self.analysis.stats() if self.analysis is not None else None
            tier = self.forwarder.health() if self.forwarder is not None else None
            return agent_health(self.counters, self.fanout, analysis, self.runs.items(), tier=tier)

        return read_retrying(build, lambda: agent_health(self.counters))

    def _check_parent(self, now: float) -> None:
        """A launcher that died without stopping us: finish once the trainers are done."""
        if self.parent_pid is None:
            return
        if not self._orphaned and os.getppid() != self.parent_pid:
            self._orphaned = True
            logger.warning(
                "outrider agent: launcher (pid %d) is gone; exiting once every stream has said "
                "bye or nothing arrives for %.0f s",
                self.parent_pid,
                self.orphan_idle,
            )
        if self._orphaned and (
            self.runs.all_streams_said_bye() or now - self._last_receive > self.orphan_idle
        ):
            self._stop_requested = True

    def _drain(self) -> None:
        """After a stop request: keep reading until quiet or every stream said bye."""
        deadline = self.clock() + self.drain_timeout
        quiet_since = self.clock()
        while self.clock() < deadline:
            if self.receive_burst(50):
                quiet_since = self.clock()
                continue
            if self.runs.all_streams_said_bye() or self.clock() - quiet_since > 0.3:
                break

    def close(self) -> None:
        self.runs.flush()
        if self.analysis is not None:
            # Final windows, dashboards and alerts go to the sinks before those close.
            self._route_alerts()
            self.analysis.close(self.config.stats.close_timeout)
            self._route_derived()
        self._closing = True
        self.fanout.close(self.sink_close_timeout)
        self._route_alerts()
        analysis = self.analysis.stats() if self.analysis is not None else None
        if self.forwarder is not None:
            self.forwarder.close(self.runs, self.config.aggregation.heartbeat_seconds + 3.0)
        tier = self.forwarder.health() if self.forwarder is not None else None
        agent_stats = agent_health(self.counters, self.fanout, analysis, tier=tier).as_dict()
        for store in self.runs:
            store.close(agent_stats)
        self.receiver.close_socket()
        if self._previous_wakeup_fd is None:  # serve() closes it once signals are restored
            self.receiver.close_wake_pipe()

    # -- signals -----------------------------------------------------------------
    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, self._on_signal)
        # A signal wakes the receive loop's poll at once (it may sleep up to a beat).
        self._previous_wakeup_fd = signal.set_wakeup_fd(
            self.receiver.wake_fd, warn_on_full_buffer=False
        )
        return previous

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.info("outrider agent: %s, draining and exiting", signal.Signals(signum).name)
            self._stop_requested = True
            return
        logger.warning("outrider agent: second signal, exiting now")
        self.runs.flush()
        os._exit(1)


def _stored_tensors_only(burst: list[Batch], refused: list[RunStore]) -> list[Batch]:
    """The burst without the tensor lines whose bytes the disk refused: the statistics
    read a line's rows from tensors.bin, where those offsets now hold nothing or newer rows."""
    stores = {store.run_id: store for store in refused}
    kept = []
    for batch in burst:
        store = stores.get(batch.source.run)
        if store is not None:
            entries = [
                entry
                for entry in batch.entries
                if entry.get("kind") != protocol.TENSOR or store.holds_tensor(entry)
            ]
            if len(entries) != len(batch.entries):
                batch = dataclasses.replace(batch, entries=entries)
        kept.append(batch)
    return kept
