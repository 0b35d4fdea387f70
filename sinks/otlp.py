"""OpenTelemetry (OTLP) sink: training scalars pushed to an OpenTelemetry Collector.

Scalars (the trainer's and the agent's derived ones) become gauges named
``<prefix>.<name>`` (``outrider.loss``) with the attributes ``run``, ``rank``
and ``host`` only (never the step: attributes must stay bounded); the step of
a rank's last scalars is the gauge ``<prefix>.step``, and the alerts the agent
stored are the cumulative counter ``<prefix>.alerts`` (attributes ``run``,
``alert``, ``severity``). The sink keeps the last value of every series and
pushes them all every ``export_interval`` seconds over OTLP/HTTP with the
OpenTelemetry SDK's own exporter, so a Collector gateway can forward them
anywhere (Prometheus remote write, another OTLP backend).

A push that fails raises from ``export``: the worker counts it and retries
with backoff (sinks/worker.py); the values stay, so the next push that gets
through carries the newest of each. The number of series is capped
(``max_series``) as in the Prometheus sink: new series past the cap are
refused and counted, and an alert is raised at most once per cooldown.
Series of ranks that finished retire after ``retire_after_seconds``; those
that went silent, after ``stale_after_seconds``. See docs/sinks.md.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import pydantic

from probe import protocol
from sinks import schema
from sinks.base import Batch, Sink, SinkAlert
from sinks.ratelimit import RateLimitedLog
from sinks.registry import SinkContext

if TYPE_CHECKING:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import Metric
    from opentelemetry.sdk.resources import Resource

logger = logging.getLogger("outrider.sinks.otlp")

ALERT_NAME = "otlp_series_cap"
ALERT_COOLDOWN_SECONDS = 300.0
#: the logger the SDK's OTLP/HTTP metric exporter reports a failed request on
SDK_EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.metric_exporter"
DEFAULT_ENDPOINT = "http://127.0.0.1:4318/v1/metrics"
METRICS_PATH = "/v1/metrics"
#: OpenTelemetry's instrument-name syntax: a letter, then letters, digits, ``_ . - /``
NAME_LIMIT = 255
_NOT_IN_NAMES = re.compile(r"[^A-Za-z0-9_./-]")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")

REFUSE_CAP = "series_cap"
REFUSE_CONFLICT = "name_conflict"

#: (run, rank, host): whose gauges these are
OwnerKey = tuple[str, int, str]
#: (run, alert name, severity): one alert counter
AlertKey = tuple[str, str, str]


class OTLPExportError(RuntimeError):
    """The collector did not take a push; the message says where and why."""


def instrument_name(prefix: str, raw: str) -> str:
    """``<prefix>.<raw>`` with characters OpenTelemetry names cannot hold replaced by ``_``.

    Letters, digits, ``_``, ``.``, ``-`` and ``/`` are kept (``train/loss`` stays
    ``outrider.train/loss``); the result is cut to OpenTelemetry's 255 characters.
    """
    return f"{prefix}.{_NOT_IN_NAMES.sub('_', raw)}"[:NAME_LIMIT]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Owner:
    """One rank's gauges: instrument name -> last value."""

    attributes: dict[str, str | int]
    last_seen: float
    values: dict[str, float] = field(default_factory=dict)
    streams: set[str] = field(default_factory=set)
    ended_at: float | None = None


@dataclass
class _AlertCount:
    count: int
    start_ns: int
    last_seen: float


class _QuietOnPush(logging.Filter):
    """Keeps the SDK exporter's own lines about our pushes out of the agent's log.

    The SDK logs every failed request and each of its quick retries; the sink
    says why a push failed in its error instead, and logs that once, rate-limited.
    Lines from other threads pass through untouched.
    """

    def __init__(self) -> None:
        super().__init__()
        self.thread: int | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread


_ERRNO = re.compile(r"\[Errno -?\d+\] [^'\")]+")


def _recording_session() -> Any:
    """A ``requests.Session`` that keeps why its last request failed.

    The SDK's exporter reports only success or failure; it takes a session of
    ours (a documented argument), and this one remembers the refused connection
    or the HTTP status that the sink's error should name.
    """
    import requests

    class RecordingSession(requests.Session):
        last_problem: str | None = None

        def send(self, request: Any, **kwargs: Any) -> Any:
            try:
                response = super().send(request, **kwargs)
            except requests.Timeout:
                self.last_problem = "no answer in time (the `timeout` option)"
                raise
            except requests.RequestException as exc:
                errno = _ERRNO.search(str(exc))
                self.last_problem = f"cannot connect: {errno.group(0)}" if errno else f"{exc}"[:300]
                raise
            if not 200 <= response.status_code < 300:
                body = response.text.strip()[:200]
                self.last_problem = f"HTTP {response.status_code} {response.reason}" + (
                    f": {body}" if body else ""
                )
            return response

    return RecordingSession()


class OTLPSink(Sink):
    """Pushes the last value of every training scalar to an OTLP/HTTP endpoint."""

    name = "otlp"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")

        endpoint: str = pydantic.Field(
            default=DEFAULT_ENDPOINT,
            description="The collector's OTLP/HTTP metrics URL; a URL without a path gets "
            "/v1/metrics.",
        )
        protocol: Literal["http/protobuf"] = pydantic.Field(
            default="http/protobuf",
            description="OTLP transport; only http/protobuf (the collector's port 4318).",
        )
        headers: dict[str, str] = pydantic.Field(
            default_factory=dict, description="HTTP headers sent with every push (auth)."
        )
        timeout: float = pydantic.Field(
            default=5.0,
            gt=0,
            le=60,
            description="Seconds one push may take, the exporter's quick retries included.",
        )
        export_interval: float = pydantic.Field(
            default=10.0, ge=0, description="Seconds between pushes of every series."
        )
        compression: Literal["gzip", "none"] = "gzip"
        insecure: bool = pydantic.Field(
            default=False,
            description="Allow plain http:// to a host other than loopback (metrics and "
            "headers then travel in clear).",
        )
        service_name: str = pydantic.Field(default="outrider", min_length=1)
        resource_attributes: dict[str, str | bool | int | float] = pydantic.Field(
            default_factory=dict,
            description="Added to the resource (deployment.environment, cluster, ...).",
        )
        prefix: str = pydantic.Field(
            default="outrider",
            pattern=r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$",
            description="First part of every instrument name.",
        )
        max_series: int = pydantic.Field(
            default=10_000,
            gt=0,
            description="Most series (name + attributes) pushed; new ones past it are refused "
            "and counted.",
        )
        retire_after_seconds: float = pydantic.Field(
            default=300.0,
            ge=0,
            description="How long the series of a rank that finished stay pushed.",
        )
        stale_after_seconds: float = pydantic.Field(
            default=3600.0,
            gt=0,
            description="Series of a rank that sent nothing for this long are dropped.",
        )

        @pydantic.field_validator("endpoint")
        @classmethod
        def _endpoint_is_a_url(cls, value: str) -> str:
            parts = urlsplit(value.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(
                    f"{value!r} is not an http:// or https:// URL with a host "
                    f"(e.g. {DEFAULT_ENDPOINT})"
                )
            try:
                parts.port  # noqa: B018 - raises on a port that is not a number
            except ValueError as exc:
                raise ValueError(f"{value!r}: {exc}") from None
            if parts.path in ("", "/"):
                parts = parts._replace(path=METRICS_PATH)
            return urlunsplit(parts)

        @pydantic.field_validator("headers")
        @classmethod
        def _headers_are_http(cls, value: dict[str, str]) -> dict[str, str]:
            for name, text in value.items():
                if not _HEADER_NAME.match(name):
                    raise ValueError(f"{name!r} is not a valid HTTP header name")
                if "\r" in text or "\n" in text:
                    raise ValueError(f"the value of header {name!r} holds a line break")
            return value

        @pydantic.model_validator(mode="after")
        def _plain_http_stays_local(self) -> OTLPSink.Options:
            parts = urlsplit(self.endpoint)
            if (
                parts.scheme == "http"
                and not _is_loopback(parts.hostname or "")
                and not (self.insecure)
            ):
                raise ValueError(
                    f"endpoint {self.endpoint} is plain http to another host: metrics and "
                    "headers would travel in clear. Use https://, or set insecure: true"
                )
            return self

    def __init__(
        self,
        options: Options | None = None,
        context: SinkContext | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.options = options or self.Options()
        self.prefix = self.options.prefix
        self.max_series = self.options.max_series
        self.endpoint = self.options.endpoint
        self.stall_after = 4 * self.options.timeout + 10
        self.clock = clock
        self.wall_clock_ns = wall_clock_ns
        self.series_cap_hit = False
        self.refused: dict[str, int] = {REFUSE_CAP: 0, REFUSE_CONFLICT: 0}
        self.pushes = 0
        self.push_failures = 0
        self.points_pushed = 0
        self.nonfinite_values = 0
        self._step_name = f"{self.prefix}.step"
        self._alerts_name = f"{self.prefix}.alerts"
        self._reserved = {self._step_name, self._alerts_name}
        self._owners: dict[OwnerKey, _Owner] = {}
        self._alert_counts: dict[AlertKey, _AlertCount] = {}
        self._runs_ended: dict[str, float] = {}
        self._count = 0
        self._names: dict[str, str] = {}  # user metric name -> the instrument it holds
        self._claims: dict[str, tuple[str, int]] = {}  # instrument -> (user name, its series)
        self._folded: Sequence[Batch] | None = None
        self._last_attempt: float | None = None
        self._failed = False
        self._dirty = False
        self._alerts_lock = threading.Lock()
        self._alerts: list[SinkAlert] = []
        self._last_cap_alert: float | None = None
        self._complaints = RateLimitedLog(30.0, clock, logger)
        self._exporter: OTLPMetricExporter | None = None
        self._resource: Resource | None = None
        self._quiet = _QuietOnPush()
        self._session: Any = None
        self._closed = False

    # -- the Sink contract -------------------------------------------------------
    def prepare(self) -> None:
        """Import the SDK and build its exporter (about 0.15 s of CPU) before any export."""
        self._ensure_exporter()

    def export(self, batches: Sequence[Batch]) -> None:
        now = self.clock()
        if batches is not self._folded:  # a retry hands over the same batches: fold them once
            self._folded = batches
            for batch in batches:
                self._fold(batch, now)
        if self._failed or (self._due(now) and (self._count or self._dirty)):
            self._push(now)

    def flush(self, timeout: float) -> None:
        now = self.clock()
        self._housekeep(now)
        if self._due(now) and (self._count or self._dirty):
            self._push(now)

    def close(self, timeout: float) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self._dirty or self._failed:
                self._push(self.clock())
        finally:
            if self._exporter is not None:
                self._exporter.shutdown(timeout_millis=timeout * 1000)
                logging.getLogger(SDK_EXPORTER_LOGGER).removeFilter(self._quiet)

    # -- for the agent -------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        return {
            "series": self._count,
            "refused_series_cap": self.refused[REFUSE_CAP],
            "refused_name_conflict": self.refused[REFUSE_CONFLICT],
            "nonfinite_values": self.nonfinite_values,
            "pushes": self.pushes,
            "push_failures": self.push_failures,
            "points_pushed": self.points_pushed,
        }

    def take_alerts(self) -> list[SinkAlert]:
        """Alerts raised since the last call (at most one per cooldown), for the alert engine."""
        with self._alerts_lock:
            alerts, self._alerts = self._alerts, []
        return alerts

    @property
    def series_count(self) -> int:
        return self._count

    # -- entries -------------------------------------------------------------------
    def _fold(self, batch: Batch, now: float) -> None:
        source = batch.source
        key: OwnerKey = (source.run, source.rank, source.host)
        for entry in batch.entries:
            kind = entry.get("kind")
            if kind == protocol.SCALARS:
                self._scalars(entry, key, entry.get("stream", source.stream), now)
            elif kind == schema.ALERT:
                self._alert(entry, source.run, now)
            elif kind == protocol.BYE:
                owner = self._owners.get(key)
                if owner is not None:
                    owner.streams.discard(entry.get("stream", source.stream))
                    if not owner.streams and owner.ended_at is None:
                        owner.ended_at = now
            elif kind == protocol.RUN_END:
                self._runs_ended[source.run] = now
                for owner in self._owners.values():
                    if owner.attributes["run"] == source.run and owner.ended_at is None:
                        owner.ended_at = now

    def _scalars(self, entry: Mapping[str, Any], key: OwnerKey, stream: str, now: float) -> None:
        metrics = entry.get("metrics")
        if not isinstance(metrics, Mapping):
            return
        owner = self._owners.get(key)
        if owner is None:
            run, rank, host = key
            owner = self._owners[key] = _Owner({"run": run, "rank": rank, "host": host}, now)
        owner.last_seen = now
        if stream != schema.AGENT_STREAM:  # derived figures do not keep a finished rank alive
            owner.ended_at = None
            owner.streams.add(stream)
            step = entry.get("step")
            if isinstance(step, int) and not isinstance(step, bool):
                self._set(owner, self._step_name, float(step))
        for raw, value in metrics.items():
            number = schema.decode_number(value)
            if number is None:
                continue
            if not math.isfinite(number):
                self.nonfinite_values += 1
            name = self._names.get(raw)
            if name is not None:  # raw holds the name's claim
                self._set(owner, name, number, raw)
            else:
                self._first_value(owner, raw, number)

    def _first_value(self, owner: _Owner, raw: str, number: float) -> None:
        """A user metric not seen (or not holding a series) yet: claim its instrument name."""
        name = instrument_name(self.prefix, raw)
        if name in self._reserved:
            name = instrument_name(f"{self.prefix}.user", raw)
        claim = self._claims.get(name)
        if claim is not None and claim[0] != raw:
            self.refused[REFUSE_CONFLICT] += 1
            self._complaints.warning(
                f"conflict:{name}",
                "outrider otlp sink: metric %r would be pushed as %s, which %r already is; "
                "its values are not pushed",
                raw,
                name,
                claim[0],
            )
            return
        if self._set(owner, name, number, raw):
            self._names[raw] = name  # only names holding a series: bounded by max_series

    def _set(self, owner: _Owner, name: str, value: float, raw: str | None = None) -> bool:
        """Set one series; False when it is new and refused (past the cap)."""
        values = owner.values
        self._dirty = True
        if name in values:
            values[name] = value
            return True
        if self._count >= self.max_series:
            self._refuse()
            return False
        values[name] = value
        self._count += 1
        if raw is not None:
            held = self._claims.get(name)
            self._claims[name] = (raw, 1 if held is None else held[1] + 1)
        return True

    def _alert(self, entry: Mapping[str, Any], default_run: str, now: float) -> None:
        run = entry.get("run")
        key: AlertKey = (
            run if isinstance(run, str) else default_run,
            str(entry.get("name", "")),
            str(entry.get("severity", "")),
        )
        count = self._alert_counts.get(key)
        self._dirty = True
        if count is None:
            if self._count >= self.max_series:
                self._refuse()
                return
            count = self._alert_counts[key] = _AlertCount(0, self.wall_clock_ns(), now)
            self._count += 1
        count.count += 1
        count.last_seen = now

    def _refuse(self) -> None:
        self.refused[REFUSE_CAP] += 1
        self.series_cap_hit = True
        now = self.clock()
        if self._last_cap_alert is not None and now - self._last_cap_alert < ALERT_COOLDOWN_SECONDS:
            return
        self._last_cap_alert = now
        message = (
            f"otlp sink: {self.max_series} series pushed, the cap; new series are refused "
            f"({self.refused[REFUSE_CAP]} values so far). Raise the otlp sink's max_series, "
            "or log fewer distinct metric names."
        )
        logger.warning("outrider %s", message)
        with self._alerts_lock:
            self._alerts.append(
                {
                    "name": ALERT_NAME,
                    "event": "series_cap",
                    "severity": "warning",
                    "message": message,
                }
            )

    def _housekeep(self, now: float) -> None:
        retire, stale = self.options.retire_after_seconds, self.options.stale_after_seconds
        for key, owner in list(self._owners.items()):
            ended = owner.ended_at is not None and now - owner.ended_at >= retire
            if ended or now - owner.last_seen >= stale:
                for name in owner.values:
                    self._release(name)
                self._count -= len(owner.values)
                del self._owners[key]
        for alert_key, count in list(self._alert_counts.items()):
            ended_at = self._runs_ended.get(alert_key[0])
            if (ended_at is not None and now - ended_at >= retire) or (
                now - count.last_seen >= stale
            ):
                del self._alert_counts[alert_key]
                self._count -= 1
        live_runs = {owner.attributes["run"] for owner in self._owners.values()}
        live_runs.update(key[0] for key in self._alert_counts)
        for run in [run for run in self._runs_ended if run not in live_runs]:
            del self._runs_ended[run]

    def _release(self, name: str) -> None:
        claim = self._claims.get(name)
        if claim is None:
            return
        if claim[1] <= 1:
            del self._claims[name]
            self._names.pop(claim[0], None)
        else:
            self._claims[name] = (claim[0], claim[1] - 1)

    # -- pushing ---------------------------------------------------------------------
    def _due(self, now: float) -> bool:
        last = self._last_attempt
        return last is None or now - last >= self.options.export_interval

    def _ensure_exporter(self) -> OTLPMetricExporter:
        if self._exporter is not None:
            return self._exporter
        from opentelemetry.exporter.otlp.proto.http import Compression
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.resources import Resource

        attributes: dict[str, str | bool | int | float] = {
            "service.name": self.options.service_name,
            **self.options.resource_attributes,
        }
        # Resource.create adds the SDK's own attributes and OTEL_RESOURCE_ATTRIBUTES.
        self._resource = Resource.create(attributes)
        compression = (
            Compression.Gzip if self.options.compression == "gzip" else Compression.NoCompression
        )
        logging.getLogger(SDK_EXPORTER_LOGGER).addFilter(self._quiet)
        self._session = _recording_session()
        self._exporter = OTLPMetricExporter(
            endpoint=self.endpoint,
            headers=dict(self.options.headers),
            timeout=self.options.timeout,
            compression=compression,
            session=self._session,
        )
        return self._exporter

    def _push(self, now: float) -> None:
        """Send every series' current value in one request; raise OTLPExportError on failure."""
        from opentelemetry.sdk.metrics.export import (
            MetricExportResult,
            MetricsData,
            ResourceMetrics,
            ScopeMetrics,
        )
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._last_attempt = now
        self._failed = True  # until the collector says otherwise
        exporter = self._ensure_exporter()
        assert self._resource is not None
        metrics, points = self._metrics(self.wall_clock_ns())
        data = MetricsData(
            [
                ResourceMetrics(
                    self._resource,
                    [ScopeMetrics(InstrumentationScope("outrider"), metrics, "")],
                    "",
                )
            ]
        )
        self._quiet.thread = threading.get_ident()
        self._session.last_problem = None
        try:
            result = exporter.export(data, timeout_millis=self.options.timeout * 1000)
        finally:
            self._quiet.thread = None
        self.pushes += 1
        if result is not MetricExportResult.SUCCESS:
            self.push_failures += 1
            why = self._session.last_problem or "the exporter gave no reason"
            message = f"otlp sink: {self.endpoint} did not take {points} data points: {why}"
            self._complaints.warning("push", "outrider %s", message)
            raise OTLPExportError(message)
        self._failed = False
        self._dirty = False
        self.points_pushed += points

    def _metrics(self, now_ns: int) -> tuple[list[Metric], int]:
        """Every series as SDK metric data (gauges of last values, counters of alerts); points."""
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Gauge,
            Metric,
            NumberDataPoint,
            Sum,
        )

        gauges: dict[str, list[NumberDataPoint]] = {}
        for owner in self._owners.values():
            for name, value in owner.values.items():
                gauges.setdefault(name, []).append(
                    NumberDataPoint(owner.attributes, 0, now_ns, value)
                )
        metrics = [
            Metric(name, self._description(name), "", Gauge(points))
            for name, points in sorted(gauges.items())
        ]
        if self._alert_counts:
            counts = [
                NumberDataPoint(
                    {"run": run, "alert": alert, "severity": severity},
                    count.start_ns,
                    now_ns,
                    count.count,
                )
                for (run, alert, severity), count in sorted(self._alert_counts.items())
            ]
            metrics.append(
                Metric(
                    self._alerts_name,
                    "Alerts the agent stored, per run, alert rule and severity.",
                    "{alert}",
                    Sum(counts, AggregationTemporality.CUMULATIVE, is_monotonic=True),
                )
            )
        return metrics, self._count

    def _description(self, name: str) -> str:
        if name == self._step_name:
            return "Step of the rank's last scalars."
        claim = self._claims.get(name)
        raw = claim[0] if claim is not None else name
        return f"Training scalar {raw!r} (last value logged, per run, rank and host)."
