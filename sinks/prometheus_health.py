"""The agent's health on the Prometheus sink's endpoint, read at scrape time.

``context.agent_stats()`` gives a ``sinks.health.AgentHealth``; each scrape
turns it into the ``<prefix>_agent_*``, ``<prefix>_probe_*``,
``<prefix>_sink_*``, stat-job and alert families declared in
``sinks/prometheus_families.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from sinks.health import AgentHealth, Health, SinkHealth, StreamHealth, TierHealth
from sinks.prometheus_families import (
    AGGREGATOR_NODES,
    ALERTS_ACTIVE,
    ALERTS_FIRED,
    ANALYSIS_DROPPED,
    BYTES_RECEIVED,
    HANDSHAKE_FAILURES,
    MESSAGES_RECEIVED,
    MESSAGES_REJECTED,
    METRIC_VALUES_OVER_CAP,
    PROBE_DROPPED,
    PROBE_LOST,
    PROBE_NOT_STORED,
    PROBE_RECEIVED,
    RECORDS_RECEIVED,
    RECORDS_REJECTED,
    SINK_DROPPED,
    SINK_EXPORTED,
    SINK_FAILURES,
    SINK_HEALTH,
    SINK_QUEUE_DEPTH,
    SINK_RETRIES,
    SINK_UP,
    STAT_JOB_DURATION,
    UPLINK_BACKLOG,
    UPLINK_CONNECTED,
    UPLINK_DROPPED,
    UPLINK_ITEMS,
    Labels,
)
from sinks.ratelimit import RateLimitedLog

logger = logging.getLogger("outrider.sinks.prometheus")


class AgentStatsCollector(Collector):
    """The agent's health (``context.agent_stats()``), read at scrape time."""

    def __init__(self, prefix: str, stats: Callable[[], AgentHealth | None] | None) -> None:
        self.prefix = prefix
        self.stats = stats
        self._complaints = RateLimitedLog(60.0, log=logger)

    def collect(self) -> Iterator[Metric]:
        if self.stats is None:
            return iter(())
        try:
            health = self.stats()
            if health is None:
                return iter(())
            return iter(list(self._metrics(health)))
        except Exception as exc:  # a scrape must not fail because of the agent's stats
            self._complaints.warning(
                "agent_stats", "outrider prometheus sink: cannot read agent stats: %r", exc
            )
            return iter(())

    def _metrics(self, health: AgentHealth) -> Iterable[Metric]:
        p = self.prefix
        yield MESSAGES_RECEIVED.family(p, health.messages)
        yield RECORDS_RECEIVED.family(p, health.records)
        yield BYTES_RECEIVED.family(p, health.bytes)
        yield _by_reason(MESSAGES_REJECTED.family(p), health.rejected_messages)
        yield _by_reason(RECORDS_REJECTED.family(p), health.rejected_records)
        yield METRIC_VALUES_OVER_CAP.family(p, health.metric_values_over_cap)
        yield from self._streams(health.runs or {})
        yield from self._sinks(health.sinks)
        if health.tier is not None:
            yield from self._tier(health.tier)
        analysis = health.analysis
        if analysis is None:
            return
        if analysis.stat_jobs:
            summary = STAT_JOB_DURATION.family(p)
            for job, cost in sorted(analysis.stat_jobs.items()):
                summary.add_metric((job,), count_value=cost.count, sum_value=cost.seconds_sum)
            yield summary
        if analysis.alerts_fired is not None:
            fired = ALERTS_FIRED.family(p)
            for alert in analysis.alerts_fired:
                fired.add_metric((alert.name, alert.severity), alert.count)
            yield fired
        yield ANALYSIS_DROPPED.family(p, analysis.dropped_batches)
        if analysis.alerts_active is not None:
            active = ALERTS_ACTIVE.family(p)
            counts: dict[Labels, int] = {}
            for held in analysis.alerts_active:
                key: Labels = (held.name, held.severity, held.run or "")
                counts[key] = counts.get(key, 0) + 1
            for key, n in sorted(counts.items()):
                active.add_metric(key, n)
            yield active

    def _tier(self, tier: TierHealth) -> Iterable[Metric]:
        p = self.prefix
        yield HANDSHAKE_FAILURES.family(p, tier.handshake_failures)
        if tier.role == "aggregator":
            yield AGGREGATOR_NODES.family(p, tier.nodes)
            return
        yield UPLINK_CONNECTED.family(p, 1 if tier.connected else 0)
        yield UPLINK_ITEMS.family(p, tier.produced)
        yield UPLINK_BACKLOG.family(p, tier.backlog)
        yield _by_reason(UPLINK_DROPPED.family(p), tier.dropped)

    def _streams(self, runs: Mapping[str, Sequence[StreamHealth]]) -> Iterable[Metric]:
        """Per-stream ledgers summed per (run, rank, host): a restarted rank has two streams."""
        p = self.prefix
        received: dict[Labels, int] = {}
        lost: dict[Labels, int] = {}
        dropped: dict[Labels, int] = {}
        not_stored: dict[Labels, int] = {}
        for run, streams in runs.items():
            for stream in streams:
                key: Labels = (run, str(stream.rank), stream.host)
                received[key] = received.get(key, 0) + stream.received
                lost[key] = lost.get(key, 0) + stream.lost
                pairs = ((dropped, stream.dropped), (not_stored, stream.not_stored))
                for counts, by_reason in pairs:
                    for reason, n in by_reason.items():
                        reason_key: Labels = (*key, reason)
                        counts[reason_key] = counts.get(reason_key, 0) + n
        received_metric = PROBE_RECEIVED.family(p)
        dropped_metric = PROBE_DROPPED.family(p)
        not_stored_metric = PROBE_NOT_STORED.family(p)
        lost_metric = PROBE_LOST.family(p)
        for key, n in sorted(received.items()):
            received_metric.add_metric(key, n)
            lost_metric.add_metric(key, lost[key])
        for reason_key, n in sorted(dropped.items()):
            dropped_metric.add_metric(reason_key, n)
        for reason_key, n in sorted(not_stored.items()):
            not_stored_metric.add_metric(reason_key, n)
        return received_metric, dropped_metric, not_stored_metric, lost_metric

    def _sinks(self, sinks: Mapping[str, SinkHealth]) -> Iterable[Metric]:
        p = self.prefix
        exported = SINK_EXPORTED.family(p)
        failures = SINK_FAILURES.family(p)
        retries = SINK_RETRIES.family(p)
        dropped = SINK_DROPPED.family(p)
        depth = SINK_QUEUE_DEPTH.family(p)
        up = SINK_UP.family(p)
        health = SINK_HEALTH.family(p)
        for name, sink_health in sorted(sinks.items()):
            sink = (name,)
            exported.add_metric(sink, sink_health.exported_entries)
            failures.add_metric(sink, sink_health.failures)
            retries.add_metric(sink, sink_health.retries)
            depth.add_metric(sink, sink_health.queue_depth)
            up.add_metric(sink, 1 if sink_health.up else 0)
            for state in Health:
                health.add_metric((*sink, str(state)), 1 if sink_health.health is state else 0)
            for reason, n in sorted(sink_health.dropped.items()):
                dropped.add_metric((*sink, reason), n)
        return exported, failures, retries, dropped, depth, up, health


def _by_reason(metric: CounterMetricFamily, counts: Mapping[str, int]) -> CounterMetricFamily:
    for reason, n in sorted(counts.items()):
        metric.add_metric((reason,), n)
    return metric
