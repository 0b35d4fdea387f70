"""Prometheus sink: a ``/metrics`` endpoint with training scalars, GPU metrics and agent health.

Training scalars become gauges ``<prefix>_<name>`` labelled by ``run``,
``rank`` and ``host`` only (never the step: labels must stay bounded). A
host's samples (``system`` entries, agent/system/sampler.py) become ``<prefix>_host_*``
gauges labelled ``host`` and ``<prefix>_process_*`` gauges labelled ``host`` and
``pid``; their GPUs are exported under the DCGM exporter's names, units and
labels, so dashboards built for it (Grafana 12239) work unchanged.
The agent's health (``sinks.health.AgentHealth``) is read at scrape time through
``context.agent_stats`` (``sinks/prometheus_health.py``). Every family the sink
exposes itself is declared once, as an ``OwnMetric`` in
``sinks/prometheus_families.py``; a user metric that would take one of their
names goes under ``<prefix>_user_``.

The number of series is capped (``max_series``): past the cap new series are
refused and counted, existing ones keep updating, and an alert is raised at
most once per cooldown. Series of ranks that finished (``bye``, ``run_end``)
are retired after ``retire_after_seconds``; those of ranks or GPUs that went
silent, after ``stale_after_seconds``. See docs/prometheus.md.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from probe import protocol
from sinks import schema
from sinks.base import Batch, Sink, SinkAlert
from sinks.prometheus_families import (
    GPU_LABELS,
    GPU_METRICS,
    HOST_METRICS,
    LAST_RECORD,
    NONFINITE,
    PROCESS_METRICS,
    SERIES,
    SERIES_LIMIT,
    SERIES_REFUSED,
    STEP,
    TRAINING_LABELS,
    Labels,
    OwnCounter,
    OwnGauge,
    own_metric_names,
    sanitize,
)
from sinks.prometheus_health import AgentStatsCollector
from sinks.registry import SinkContext

logger = logging.getLogger("outrider.sinks.prometheus")

ALERT_NAME = "prometheus_series_cap"
ALERT_COOLDOWN_SECONDS = 300.0
HOUSEKEEPING_INTERVAL_SECONDS = 1.0

REFUSE_CAP = "series_cap"
REFUSE_CONFLICT = "name_conflict"


@dataclass
class _Family:
    name: str
    help: str
    labelnames: Labels
    counter: bool = False
    values: dict[Labels, float] = field(default_factory=dict)
    owner_name: str | None = None  # the user metric that claimed this name


_Samples = tuple[_Family, list[tuple[Labels, float]]]


@dataclass
class _Owner:
    """Whose series these are: one (run, rank, host), or one host's GPUs."""

    labels: Labels
    last_seen: float
    series: set[tuple[str, Labels]] = field(default_factory=set)
    streams: set[str] = field(default_factory=set)
    ended_at: float | None = None


class PrometheusSink(Sink):
    """Serves ``/metrics`` from its own registry; see the module docstring."""

    name = "prometheus"
    between_runs = True  # host and GPU gauges between runs, as a DCGM exporter serves them

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")

        host: str = pydantic.Field(
            default="127.0.0.1",
            description="Address to serve /metrics on; loopback unless you mean otherwise.",
        )
        port: int = pydantic.Field(
            default=9400, ge=0, le=65535, description="TCP port for /metrics; 0 picks a free one."
        )
        max_series: int = pydantic.Field(
            default=10_000,
            gt=0,
            description="Most series (name + label values) exported; new ones past it are "
            "refused and counted.",
        )
        prefix: str = pydantic.Field(
            default="outrider",
            pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
            description="Prefix of every outrider metric name (GPU metrics keep DCGM's names).",
        )
        retire_after_seconds: float = pydantic.Field(
            default=300.0,
            ge=0,
            description="How long the series of a rank that finished (bye, run_end) stay "
            "exported before they are removed.",
        )
        stale_after_seconds: float = pydantic.Field(
            default=3600.0,
            gt=0,
            description="Series of a rank or a host's GPUs that received nothing for this "
            "long are removed.",
        )

    def __init__(
        self,
        options: Options | None = None,
        context: SinkContext | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options or self.Options()
        self.prefix = self.options.prefix
        self.max_series = self.options.max_series
        self.clock = clock
        self.series_cap_hit = False
        self.refused: dict[str, int] = {REFUSE_CAP: 0, REFUSE_CONFLICT: 0}
        self._lock = threading.Lock()
        self._count = 0
        self._families: dict[str, _Family] = {}
        self._user_names: dict[str, str] = {}  # memo: user metric name -> its family's name
        self._reserved = own_metric_names(self.prefix)
        self._owners: dict[Labels, _Owner] = {}
        self._gpu_owners: dict[str, _Owner] = {}
        self._alerts: list[SinkAlert] = []
        self._last_cap_alert: float | None = None
        self._last_housekeeping = clock()
        self._warned_conflicts: set[str] = set()
        self._step = self._own_family(STEP)
        self._last_record = self._own_family(LAST_RECORD)
        self._nonfinite = self._own_family(NONFINITE)
        for _, dcgm_name, _, help_text in GPU_METRICS:
            self._family(dcgm_name, help_text, GPU_LABELS)

        self.registry = CollectorRegistry()
        self.registry.register(_SinkCollector(self))
        stats = context.agent_stats if context is not None else None
        self.registry.register(AgentStatsCollector(self.prefix, stats))
        try:
            self._server, self._thread = start_http_server(
                self.options.port, addr=self.options.host, registry=self.registry
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"prometheus sink: cannot serve /metrics on {self.options.host}:"
                f"{self.options.port}: {exc.strerror or exc} (another agent or exporter "
                "may hold the port; choose another `port`, or 0 for any free one)",
            ) from exc
        self.port: int = self._server.server_port
        host = self.options.host
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"
        self._closed = False
        logger.info("outrider prometheus sink: serving %s", self.url)

    # -- the Sink contract -------------------------------------------------------
    def export(self, batches: Sequence[Batch]) -> None:
        now = self.clock()
        with self._lock:
            for batch in batches:
                self._export_batch(batch, now)
            if now - self._last_housekeeping >= HOUSEKEEPING_INTERVAL_SECONDS:
                self._housekeep(now)

    def flush(self, timeout: float) -> None:
        now = self.clock()
        with self._lock:
            self._housekeep(now)

    def close(self, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)

    # -- for the agent -------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {
            "series": self._count,
            "refused_series_cap": self.refused[REFUSE_CAP],
            "refused_name_conflict": self.refused[REFUSE_CONFLICT],
        }

    def take_alerts(self) -> list[SinkAlert]:
        """Alerts raised since the last call (at most one per cooldown), for the alert engine."""
        with self._lock:
            alerts, self._alerts = self._alerts, []
        return alerts

    @property
    def series_count(self) -> int:
        return self._count

    # -- entries -------------------------------------------------------------------
    def _export_batch(self, batch: Batch, now: float) -> None:
        source = batch.source
        labels: Labels = (source.run, str(source.rank), source.host)
        owner: _Owner | None = None
        for entry in batch.entries:
            kind = entry.get("kind")
            if kind in schema.TRAINER_KINDS:
                if owner is None:
                    owner = self._owner(labels, now)
                self._trainer_record(entry, kind, owner, source.stream, now)
            elif kind == schema.SYSTEM:
                self._system(entry, source.host, now)
            elif kind == protocol.BYE:
                finished = self._owners.get(labels)
                if finished is not None:
                    finished.streams.discard(entry.get("stream", source.stream))
                    if not finished.streams:
                        self._end(finished, now)
            elif kind == protocol.RUN_END:
                for run_owner in list(self._owners.values()):
                    if run_owner.labels[0] == source.run:
                        self._end(run_owner, now)

    def _trainer_record(
        self, entry: Mapping[str, Any], kind: str, owner: _Owner, stream: str, now: float
    ) -> None:
        labels = owner.labels
        owner.last_seen = now
        owner.ended_at = None
        owner.streams.add(entry.get("stream", stream))
        t = entry.get("t")
        if isinstance(t, int | float):
            last = self._last_record.values.get(labels)
            if last is None or t > last:
                self._set(self._last_record, labels, float(t), owner)
        step = entry.get("step")
        if isinstance(step, int):
            self._set(self._step, labels, float(step), owner)
        if kind != protocol.SCALARS:
            return
        metrics = entry.get("metrics")
        if not isinstance(metrics, Mapping):
            return
        nonfinite = 0
        families = self._families
        for raw, value in metrics.items():
            number = schema.decode_number(value)
            if number is None:
                continue
            if not math.isfinite(number):
                nonfinite += 1
            name = self._user_names.get(raw)
            family = families.get(name) if name is not None else None
            if family is None:
                family = self._user_family(raw)
                if family is None:
                    continue
            self._set(family, labels, number, owner)
        if nonfinite and labels in self._nonfinite.values:
            self._nonfinite.values[labels] += nonfinite

    def _system(self, entry: Mapping[str, Any], default_host: str, now: float) -> None:
        """A host's sample: host and trainer-process gauges, and GPUs under DCGM's names.

        One owner per host holds all of them (stale after ``stale_after_seconds``
        of silence). A process line missing from a sample (its trainer exited)
        takes its series with it at once: pids are not reused as labels forever.
        """
        host = entry.get("host")
        hostname = host if isinstance(host, str) else default_host
        owner = self._gpu_owners.get(hostname)
        if owner is None:
            owner = self._gpu_owners[hostname] = _Owner((hostname,), now)
        owner.last_seen = now
        host_labels: Labels = (hostname,)
        for key, metric, factor in HOST_METRICS:
            value = entry.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                self._set(self._own_family(metric), host_labels, value * factor, owner)
        processes = entry.get("processes")
        if isinstance(processes, list):
            live: set[Labels] = set()
            for process in processes:
                pid = process.get("pid") if isinstance(process, Mapping) else None
                if not isinstance(pid, int) or isinstance(pid, bool):
                    continue
                labels: Labels = (hostname, str(pid))
                live.add(labels)
                for key, metric, factor in PROCESS_METRICS:
                    value = process.get(key)
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        self._set(self._own_family(metric), labels, value * factor, owner)
            process_names = {metric.full_name(self.prefix) for _, metric, _ in PROCESS_METRICS}
            for name, labels in [
                key for key in owner.series if key[0] in process_names and key[1] not in live
            ]:
                owner.series.discard((name, labels))
                if self._families[name].values.pop(labels, None) is not None:
                    self._count -= 1
        gpus = entry.get("gpus")
        if not isinstance(gpus, list):
            return
        for gpu in gpus:
            if not isinstance(gpu, Mapping):
                continue
            index = gpu.get("index")
            labels = (
                str(index),
                str(gpu.get("uuid", "")),
                f"nvidia{index}",
                str(gpu.get("name", "")),
                hostname,
            )
            for key, dcgm_name, factor, _ in GPU_METRICS:
                value = gpu.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._set(self._families[dcgm_name], labels, value * factor, owner)

    def _own_family(self, metric: OwnGauge | OwnCounter) -> _Family:
        """One of the sink's own families, made on first use (user metrics cannot take it)."""
        family = self._families.get(metric.full_name(self.prefix))
        if family is None:
            family = self._family(
                metric.full_name(self.prefix),
                metric.help,
                metric.labels,
                counter=isinstance(metric, OwnCounter),
            )
        return family

    # -- series bookkeeping (under the lock) -------------------------------------------
    def _family(
        self, name: str, help_text: str, labelnames: Labels, counter: bool = False
    ) -> _Family:
        family = self._families[name] = _Family(name, help_text, labelnames, counter)
        return family

    def _owner(self, labels: Labels, now: float) -> _Owner:
        owner = self._owners.get(labels)
        if owner is None:
            owner = self._owners[labels] = _Owner(labels, now)
            self._set(self._nonfinite, labels, 0.0, owner)
        return owner

    def _user_family(self, raw: str) -> _Family | None:
        """The family of user metric ``raw``, created if need be; None when refused (counted)."""
        name = f"{self.prefix}_{sanitize(raw)}"
        if name in self._reserved:
            name = f"{self.prefix}_user_{sanitize(raw)}"
        family = self._families.get(name)
        if family is None:
            if self._count >= self.max_series:  # no empty families past the cap
                self._refuse(REFUSE_CAP)
                return None
            family = self._family(
                name,
                f"Training scalar {raw!r} (last value logged, per run, rank and host).",
                TRAINING_LABELS,
            )
            family.owner_name = raw
        elif family.owner_name != raw:
            self._refuse(REFUSE_CONFLICT)
            if raw not in self._warned_conflicts and len(self._warned_conflicts) < 1000:
                self._warned_conflicts.add(raw)
                logger.warning(
                    "outrider prometheus sink: metric %r would be exported as %s, which %s "
                    "already is; its values are not exported",
                    raw,
                    name,
                    repr(family.owner_name) if family.owner_name else "outrider's own metric",
                )
            return None
        if len(self._user_names) >= 4 * self.max_series:
            self._user_names.clear()  # a memo only: distinct names must not grow it forever
        self._user_names[raw] = name
        return family

    def _set(self, family: _Family, labels: Labels, value: float, owner: _Owner) -> None:
        values = family.values
        if labels in values:
            values[labels] = value
            return
        if self._count >= self.max_series:
            self._refuse(REFUSE_CAP)
            return
        values[labels] = value
        self._count += 1
        owner.series.add((family.name, labels))

    def _refuse(self, reason: str) -> None:
        self.refused[reason] += 1
        if reason != REFUSE_CAP:
            return
        self.series_cap_hit = True
        now = self.clock()
        if self._last_cap_alert is not None and now - self._last_cap_alert < ALERT_COOLDOWN_SECONDS:
            return
        self._last_cap_alert = now
        message = (
            f"prometheus sink: {self.max_series} series exported, the cap; new series are "
            f"refused ({self.refused[REFUSE_CAP]} values so far). Raise the prometheus sink's "
            "max_series, or log fewer distinct metric names."
        )
        logger.warning("outrider %s", message)
        self._alerts.append(
            {"name": ALERT_NAME, "event": "series_cap", "severity": "warning", "message": message}
        )

    def _end(self, owner: _Owner, now: float) -> None:
        """A finished rank: it is no longer 'stalled'; its other series retire later."""
        if owner.ended_at is None:
            owner.ended_at = now
        self._remove(owner, {self._last_record.name})

    def _remove(self, owner: _Owner, only: set[str] | None = None) -> None:
        for key in [k for k in owner.series if only is None or k[0] in only]:
            owner.series.discard(key)
            name, labels = key
            family = self._families.get(name)
            if family is None or family.values.pop(labels, None) is None:
                continue
            self._count -= 1
            if family.owner_name is not None and not family.values:
                del self._families[name]
                self._user_names.pop(family.owner_name, None)

    def _housekeep(self, now: float) -> None:
        self._last_housekeeping = now
        retire, stale = self.options.retire_after_seconds, self.options.stale_after_seconds
        for labels, owner in list(self._owners.items()):
            ended = owner.ended_at is not None and now - owner.ended_at >= retire
            if ended or now - owner.last_seen >= stale:
                self._remove(owner)
                del self._owners[labels]
        for host, owner in list(self._gpu_owners.items()):
            if now - owner.last_seen >= stale:
                self._remove(owner)
                del self._gpu_owners[host]

    def _snapshot(self) -> tuple[list[_Samples], int, dict[str, int]]:
        with self._lock:
            families = [
                (family, list(family.values.items()))
                for family in self._families.values()
                if family.values
            ]
            return families, self._count, dict(self.refused)


class _SinkCollector(Collector):
    """The sink's series, read at scrape time."""

    def __init__(self, sink: PrometheusSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        families, count, refused = self.sink._snapshot()
        for family, samples in sorted(families, key=lambda item: item[0].name):
            metric: GaugeMetricFamily | CounterMetricFamily
            if family.counter:
                metric = CounterMetricFamily(family.name, family.help, labels=family.labelnames)
            else:
                metric = GaugeMetricFamily(family.name, family.help, labels=family.labelnames)
            for labels, value in samples:
                metric.add_metric(labels, value)
            yield metric
        p = self.sink.prefix
        yield SERIES.family(p, count)
        yield SERIES_LIMIT.family(p, self.sink.max_series)
        refused_metric = SERIES_REFUSED.family(p)
        for reason, n in sorted(refused.items()):
            refused_metric.add_metric((reason,), n)
        yield refused_metric
