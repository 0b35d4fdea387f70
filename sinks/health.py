"""The agent's health as one typed snapshot: what ``/metrics`` shows and run.json keeps.

The agent builds it (``agent/health.py``) from its counters, its sinks'
workers, its analysis and its run stores, and hands it to sinks through
``SinkContext.agent_stats``; the Prometheus sink reads the fields, never
dict keys. ``as_dict`` is the form run.json stores under ``agent``: keys and
their order are part of that file's format. Imports nothing of ``agent``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


class Health(enum.StrEnum):
    """A sink's state, as its worker sees it."""

    OK = "ok"
    RETRYING = "retrying"  # the last export failed; retrying with backoff
    FAILING = "failing"  # retries ran out, or the sink could not be built; batches are dropped
    STALLED = "stalled"  # an export or flush has not returned for too long
    CLOSED = "closed"  # closed after working normally


@dataclass(frozen=True)
class SinkHealth:
    """One sink's delivery figures; a sink that could not be built has no batches or counters."""

    health: Health
    queue_depth: int
    exported_entries: int
    failures: int
    retries: int
    dropped: Mapping[str, int]  # reason -> entries
    last_error: str | None
    exported_batches: int | None = None  # None: the sink was never built
    counters: Mapping[str, int] | None = None  # the sink's own (Sink.counters); None: never built

    @classmethod
    def unbuilt(cls, reason: str) -> SinkHealth:
        """A configured sink that failed to build (a taken port, a missing library)."""
        return cls(Health.FAILING, 0, 0, 1, 0, {}, reason)

    @property
    def up(self) -> bool:
        return self.health is Health.OK

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {"health": str(self.health), "queue_depth": self.queue_depth}
        if self.exported_batches is not None:
            shown["exported_batches"] = self.exported_batches
        shown["exported_entries"] = self.exported_entries
        shown["failures"] = self.failures
        shown["retries"] = self.retries
        shown["dropped"] = dict(self.dropped)
        shown["last_error"] = self.last_error
        if self.counters is not None:
            shown["sink"] = dict(self.counters)
        return shown


@dataclass(frozen=True)
class StreamHealth:
    """One probe stream's accounting: ``received + dropped + lost == sent`` once complete."""

    stream: str
    rank: int
    host: str
    sent: int
    received: int
    dropped: Mapping[str, int]  # reason -> records, as the probe reports them
    lost: int
    complete: bool  # the stream said bye
    not_stored: Mapping[str, int] = dataclasses.field(default_factory=dict)  # of received

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class JobCost:
    """What one kind of statistics job cost so far."""

    count: int
    seconds_sum: float
    seconds_max: float
    last_seconds: float
    cpu_seconds_sum: float
    superseded: int
    failed: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ActiveAlert:
    """An alert whose condition holds now (or a recent one-shot)."""

    name: str
    severity: str
    run: str | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FiredAlert:
    """How often one alert rule fired at one severity, after cooldowns."""

    name: str
    severity: str
    count: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AnalysisHealth:
    """The statistics and alert engine; the alert fields are None until the engine reports."""

    stat_jobs: Mapping[str, JobCost]
    dropped_batches: int  # batches the statistics could not keep up with
    alert_engine: Mapping[str, Any] | None = None  # the engine's own figures, as it reports them
    alerts_active: Sequence[ActiveAlert] | None = None
    alerts_fired: Sequence[FiredAlert] | None = None

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {}
        if self.alert_engine is not None:
            shown["alert_engine"] = dict(self.alert_engine)
        if self.alerts_active is not None:
            shown["alerts_active"] = [alert.as_dict() for alert in self.alerts_active]
        if self.alerts_fired is not None:
            shown["alerts_fired"] = [alert.as_dict() for alert in self.alerts_fired]
        shown["stat_jobs"] = {job: cost.as_dict() for job, cost in self.stat_jobs.items()}
        shown["analysis_dropped"] = self.dropped_batches
        return shown


@dataclass(frozen=True)
class TierHealth:
    """The job tier as one process sees it: a node agent's uplink to its aggregator, or an
    aggregator's listener (handshakes) and the nodes feeding it."""

    role: str  # "node" or "aggregator"
    connected: bool = False  # node: the aggregator is reachable now
    produced: int = 0  # node: items made for the aggregator, dropped ones included
    sent: int = 0  # node: items handed to the transport
    backlog: int = 0  # node: items waiting (memory and spool)
    dropped: Mapping[str, int] = dataclasses.field(default_factory=dict)  # node, by reason
    handshake_failures: int = 0  # either end: CURVE handshakes that failed
    nodes: int = 0  # aggregator: nodes heard from
    jobs: int = 0  # aggregator: job views open

    def as_dict(self) -> dict[str, Any]:
        shown = dataclasses.asdict(self)
        shown["dropped"] = dict(self.dropped)
        return shown


@dataclass(frozen=True)
class AgentHealth:
    """Everything the agent knows about its own health at one moment."""

    messages: int
    records: int
    bytes: int
    rejected_messages: Mapping[str, int]  # reason -> messages
    rejected_records: Mapping[str, int]  # reason -> records
    sinks: Mapping[str, SinkHealth]
    analysis: AnalysisHealth | None = None  # None: the agent runs without analysis
    runs: Mapping[str, Sequence[StreamHealth]] | None = None  # None: not part of this snapshot
    #: scalar values not given to the analysis and sinks: their name came past a run's
    #: max_metric_names (the run store has them)
    metric_values_over_cap: int = 0
    tier: TierHealth | None = None  # None: not part of a job tier

    def as_dict(self) -> dict[str, Any]:
        shown: dict[str, Any] = {
            "messages": self.messages,
            "records": self.records,
            "bytes": self.bytes,
            "rejected_messages": dict(self.rejected_messages),
            "rejected_records": dict(self.rejected_records),
            "metric_values_over_cap": self.metric_values_over_cap,
            "sinks": {name: sink.as_dict() for name, sink in self.sinks.items()},
        }
        if self.analysis is not None:
            shown.update(self.analysis.as_dict())
        if self.tier is not None:
            shown["tier"] = self.tier.as_dict()
        if self.runs is not None:
            shown["runs"] = {
                run: {"streams": [stream.as_dict() for stream in streams]}
                for run, streams in self.runs.items()
            }
        return shown
