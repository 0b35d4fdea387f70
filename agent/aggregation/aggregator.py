"""The job aggregator: one process that owns the view of every job its node agents feed.

It receives node agents' items (``agent.aggregation.wire``) on one PULL
socket (CURVE off loopback), keeps each job's view (``agent.aggregation.job``)
and is the only writer of the job's W&B run and TensorBoard log. Like the
node agent, one thread receives, stores and fans out; the loop's beat judges
job windows, rewrites run.json and kicks the sinks once a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from agent.aggregation import wire
from agent.aggregation.job import JobView, Out
from agent.aggregation.listener import Listener
from agent.config import AgentConfig
from agent.fanout import Fanout
from agent.health import agent_health, read_retrying
from agent.ingest.counters import AgentCounters
from agent.store.registry import MAX_OPEN_RUNS, OpenRuns
from probe.identity import host_name
from sinks.base import Batch, Source
from sinks.health import AgentHealth, TierHealth
from sinks.ratelimit import RateLimitedLog
from sinks.registry import SinkContext

logger = logging.getLogger("outrider.aggregator")

BEAT_SECONDS = 1.0
#: sinks that take each rank's entries; the rest (Prometheus) keep to job-level series,
#: since every node agent already exports its ranks' series
PER_RANK_SKIP = frozenset({"prometheus"})
#: the stream named in the sinks' sources: a rank's entries (forwarded by its node) and the
#: aggregator's own (job scalars, job alerts)
NODE_STREAM = "node"
JOB_STREAM = "aggregator"


class Aggregator:
    """Binds the job tier's endpoint and keeps one :class:`JobView` per job."""

    def __init__(
        self,
        bind: str,
        runs_dir: Path,
        *,
        config: AgentConfig | None = None,
        fanout: Fanout | None = None,
        drain_timeout: float = 5.0,
        parent_pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or AgentConfig()
        settings = self.config.aggregation
        self.runs_dir = runs_dir
        self.drain_timeout = drain_timeout
        self.parent_pid = parent_pid
        self.clock = clock
        self.host = host_name()
        self.counters = AgentCounters()
        self.complaints = RateLimitedLog(clock=clock)
        self.listener = Listener(bind, keys_dir=settings.keys_dir, insecure=settings.insecure)
        self.runs = OpenRuns(runs_dir, histogram_bins=self.config.histogram_bins)
        self.jobs: dict[str, JobView] = {}
        if fanout is None:
            context = SinkContext(runs_dir, agent_stats=self.stats)
            fanout = Fanout.from_config(self.config, context) if config is not None else Fanout()
        self.fanout = fanout
        self._stop = False
        self._signals = 0

    @property
    def endpoint(self) -> str:
        return self.listener.endpoint

    # -- receiving ---------------------------------------------------------------------
    def ingest(self, raw: bytes) -> None:
        """Decode one node message; account for and store its items."""
        counters = self.counters
        counters.messages += 1
        counters.bytes += len(raw)
        try:
            message = wire.decode(raw)
        except wire.Rejected as rejected:
            counters.reject(counters.rejected_messages, rejected.reason)
            self.complaints.warning(
                rejected.reason, "outrider aggregator: rejected a message (%s)", rejected
            )
            return
        for reason, detail in message.rejected:
            counters.reject(counters.rejected_records, reason)
            self.complaints.warning(
                f"item:{reason}", "outrider aggregator: rejected an item (%s: %s)", reason, detail
            )
        if not message.items:
            return
        job = self._job(message.envelope["job"])
        if job is None:
            counters.reject(counters.rejected_messages, "too_many_runs")
            self.complaints.warning(
                "too_many_runs",
                "outrider aggregator: more than %d jobs open; job %s refused",
                MAX_OPEN_RUNS,
                message.envelope["job"],
            )
            return
        counters.records += len(message.items)
        for item in message.items:
            try:
                outs = job.take(message.envelope, item)
            except Exception as exc:  # one odd item costs itself, not the message
                counters.reject(counters.rejected_records, "bad_item_body")
                self.complaints.warning(
                    "bad_item_body", "outrider aggregator: item %s not taken: %r", item.kind, exc
                )
                continue
            self._send(job, outs)

    def _job(self, job_id: str) -> JobView | None:
        view = self.jobs.get(job_id)
        if view is None:
            store = self.runs.open(job_id)
            if store is None:
                return None
            store.info.setdefault("launcher", "outrider aggregator")
            view = self.jobs[job_id] = JobView(store, self.config.aggregation, self.clock)
        return view

    def _send(self, job: JobView, outs: list[Out]) -> None:
        if not outs or not self.fanout.workers:
            return
        for out in outs:
            source = Source(
                job.job,
                NODE_STREAM if out.rank >= 0 else JOB_STREAM,
                out.rank,
                out.local_rank,
                max(len(job.ranks), 1),
                out.host or self.host,
                os.getpid(),
            )
            batch = Batch(source, [out.entry], str(job.store.dir))
            self.fanout.submit(batch, PER_RANK_SKIP if out.per_rank else frozenset())

    def receive_burst(self, timeout_ms: int) -> int:
        if not self.listener.wait(timeout_ms):
            return 0
        count = 0
        for raw in self.listener.burst():
            count += 1
            try:
                self.ingest(raw)
            except Exception as exc:  # a bug of ours must not end the aggregator
                self.counters.reject(self.counters.rejected_messages, "internal_error")
                self.complaints.warning(
                    "internal_error", "outrider aggregator: internal error: %r", exc
                )
        self.runs.flush()
        return count

    # -- the loop ----------------------------------------------------------------------
    def serve(self, ready: Callable[[], None] | None = None) -> int:
        with contextlib.suppress(OSError):
            self.runs_dir.mkdir(parents=True, exist_ok=True)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.fanout.wait_prepared(5.0)
            if ready is not None:
                ready()
            last_beat = self.clock()
            while not self._stop:
                wait = last_beat + BEAT_SECONDS - self.clock()
                self.receive_burst(max(0, int(wait * 1000) + 1))
                now = self.clock()
                if now - last_beat >= BEAT_SECONDS:
                    last_beat = now
                    self.beat()
            self._drain()
        finally:
            self.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 0

    def beat(self) -> None:
        """Judge complete windows, rewrite run.json, kick the sinks, watch the parent."""
        for job in self.jobs.values():
            try:
                self._send(job, job.judge())
            except Exception as exc:  # a bug of ours must not end the aggregator
                self.counters.reject(self.counters.rejected_messages, "internal_error")
                self.complaints.warning(
                    "internal_error", "outrider aggregator: internal error judging: %r", exc
                )
        self.runs.flush()
        now = self.clock()
        for job in self.jobs.values():
            job.store.merge_collected()
            if job.view_due(now):
                job.store.write_info()
                job.wrote_view(now)
        self.listener.counters()  # reads the handshake events (and logs failed ones)
        self.fanout.kick()
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            logger.warning("outrider aggregator: launcher is gone; exiting")
            self._stop = True

    def _drain(self) -> None:
        """After a stop request: keep receiving until every node said bye, or quiet."""
        deadline = self.clock() + self.drain_timeout
        quiet_since = self.clock()
        while self.clock() < deadline:
            if self.receive_burst(100):
                quiet_since = self.clock()
                continue
            done = all(job.all_said_bye() for job in self.jobs.values())
            if done or self.clock() - quiet_since > 1.0:
                break

    def close(self) -> None:
        for job in self.jobs.values():
            try:
                self._send(job, job.finish())
            except Exception as exc:
                logger.error(
                    "outrider aggregator: job %s: last windows not judged: %r", job.job, exc
                )
        self.runs.flush()
        self.fanout.close(self.config.sink_close_timeout)
        stats = self.stats().as_dict()
        for store in self.runs:
            store.close(stats)
        self.listener.close()

    def stats(self) -> AgentHealth:
        """The aggregator's health, as /metrics and run.json show it (safe from any thread)."""

        def build() -> AgentHealth:
            tier = TierHealth(
                role="aggregator",
                handshake_failures=self.listener.counters()["handshake_failures"],
                nodes=len({node for job in list(self.jobs.values()) for node in job.nodes}),
                jobs=len(self.jobs),
            )
            return agent_health(self.counters, self.fanout, tier=tier)

        return read_retrying(build, lambda: agent_health(self.counters, self.fanout))

    # -- signals -----------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            logger.info("outrider aggregator: %s, draining", signal.Signals(signum).name)
            self._stop = True
            return
        logger.warning("outrider aggregator: second signal, exiting now")
        self.runs.flush()
        os._exit(1)
