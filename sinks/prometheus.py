"""Prometheus sink: a ``/metrics`` endpoint with training scalars, GPU metrics and agent health.

Training scalars become gauges ``<prefix>_<name>`` labelled by ``run``,
``rank`` and ``host`` only (never the step: labels must stay bounded). A
host's samples (``system`` entries, agent/system/sampler.py) become ``<prefix>_host_*``
gauges labelled ``host`` and ``<prefix>_process_*`` gauges labelled ``host`` and
``pid``; their GPUs are exported under the DCGM exporter's names, units and
labels, so dashboards built for it (Grafana 12239) work unchanged.
The agent's health (``sinks.health.AgentHealth``) is read at scrape time through
``context.agent_stats``. Every family the sink exposes itself is declared once,
below, as an ``OwnMetric``; a user metric that would take one of their names
goes under ``<prefix>_user_``.

The number of series is capped (``max_series``): past the cap new series are
refused and counted, existing ones keep updating, and an alert is raised at
most once per cooldown. Series of ranks that finished (``bye``, ``run_end``)
are retired after ``retire_after_seconds``; those of ranks or GPUs that went
silent, after ``stale_after_seconds``. See docs/prometheus.md.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from probe import protocol
from sinks import schema
from sinks.base import Batch, Sink, SinkAlert
from sinks.health import AgentHealth, Health, SinkHealth, StreamHealth
from sinks.registry import SinkContext

logger = logging.getLogger("outrider.sinks.prometheus")

ALERT_NAME = "prometheus_series_cap"
ALERT_COOLDOWN_SECONDS = 300.0
HOUSEKEEPING_INTERVAL_SECONDS = 1.0

Labels = tuple[str, ...]

TRAINING_LABELS: Labels = ("run", "rank", "host")
GPU_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname")  # the DCGM exporter's

REFUSE_CAP = "series_cap"
REFUSE_CONFLICT = "name_conflict"

MIB = float(1 << 20)
KIB = 1024.0

#: system entry field -> (DCGM exporter metric, factor to the DCGM unit, HELP)
GPU_METRICS: tuple[tuple[str, str, float, str], ...] = (
    ("util_percent", "DCGM_FI_DEV_GPU_UTIL", 1.0, "GPU utilization (in %)."),
    (
        "util_percent",
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE",
        0.01,
        "Ratio of time the graphics engine is active (outrider: NVML utilization / 100).",
    ),
    ("memory_used_bytes", "DCGM_FI_DEV_FB_USED", 1 / MIB, "Framebuffer memory used (in MiB)."),
    ("memory_free_bytes", "DCGM_FI_DEV_FB_FREE", 1 / MIB, "Framebuffer memory free (in MiB)."),
    ("temperature_c", "DCGM_FI_DEV_GPU_TEMP", 1.0, "GPU temperature (in C)."),
    ("power_watts", "DCGM_FI_DEV_POWER_USAGE", 1.0, "Power draw (in W)."),
    ("sm_clock_mhz", "DCGM_FI_DEV_SM_CLOCK", 1.0, "SM clock frequency (in MHz)."),
    (
        "pcie_tx_bytes_per_s",
        "DCGM_FI_DEV_PCIE_TX_THROUGHPUT",
        1 / KIB,
        "PCIe TX throughput (in KB/s, as NVML samples it).",
    ),
    (
        "pcie_rx_bytes_per_s",
        "DCGM_FI_DEV_PCIE_RX_THROUGHPUT",
        1 / KIB,
        "PCIe RX throughput (in KB/s, as NVML samples it).",
    ),
    ("xid_errors", "DCGM_FI_DEV_XID_ERRORS", 1.0, "Value of the last XID error encountered."),
    ("memory_util_percent", "DCGM_FI_DEV_MEM_COPY_UTIL", 1.0, "Memory utilization (in %)."),
    ("mem_clock_mhz", "DCGM_FI_DEV_MEM_CLOCK", 1.0, "Memory clock frequency (in MHz)."),
    (
        "energy_joules",
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
        1000.0,
        "Total energy consumption since the driver was loaded (in mJ).",
    ),
    (
        "ecc_sbe_volatile_total",
        "DCGM_FI_DEV_ECC_SBE_VOL_TOTAL",
        1.0,
        "Total number of single-bit volatile ECC errors.",
    ),
    (
        "ecc_dbe_volatile_total",
        "DCGM_FI_DEV_ECC_DBE_VOL_TOTAL",
        1.0,
        "Total number of double-bit volatile ECC errors.",
    ),
)

HOST_LABELS: Labels = ("host",)
PROCESS_LABELS: Labels = ("host", "pid")

_INVALID_CHARS = re.compile(r"[^a-zA-Z0-9_]")
#: what a family's samples may add to its name (a counter's ``_total``, a summary's ``_sum``, ...)
_SUFFIXES = ("", "_total", "_created", "_count", "_sum", "_bucket", "_info")


def sanitize(name: str) -> str:
    """A user metric name as a Prometheus name fragment: every invalid character becomes ``_``."""
    return _INVALID_CHARS.sub("_", name)


# -- the sink's own metric families ---------------------------------------------------------------
#: every family declared below, in order: their names are the ones user metrics may not take
OWN_METRICS: list[OwnMetric] = []


@dataclass(frozen=True)
class OwnMetric:
    """A family the sink exposes itself, named ``<prefix>_<name>``.

    Declaring one reserves its name (with every sample suffix): a user metric
    of the same name goes under ``<prefix>_user_``, so no scrape can hold two
    families of one name.
    """

    name: str
    help: str
    labels: Labels = ()

    def __post_init__(self) -> None:
        OWN_METRICS.append(self)

    def full_name(self, prefix: str) -> str:
        return f"{prefix}_{self.name}"

    def _labels(self, value: float | None) -> Labels | None:
        return None if value is not None else self.labels


class OwnGauge(OwnMetric):
    def family(self, prefix: str, value: float | None = None) -> GaugeMetricFamily:
        """The family to add samples to; with ``value``, its one unlabelled sample."""
        return GaugeMetricFamily(
            self.full_name(prefix), self.help, value=value, labels=self._labels(value)
        )


class OwnCounter(OwnMetric):
    def family(self, prefix: str, value: float | None = None) -> CounterMetricFamily:
        """The family to add samples to; with ``value``, its one unlabelled sample."""
        return CounterMetricFamily(
            self.full_name(prefix), self.help, value=value, labels=self._labels(value)
        )


class OwnSummary(OwnMetric):
    def family(self, prefix: str) -> SummaryMetricFamily:
        return SummaryMetricFamily(self.full_name(prefix), self.help, labels=self.labels)


def own_metric_names(prefix: str) -> frozenset[str]:
    """Every name the sink exposes itself (with sample suffixes): user metrics may not take one."""
    return frozenset(
        f"{metric.full_name(prefix)}{suffix}" for metric in OWN_METRICS for suffix in _SUFFIXES
    )


# training
STEP = OwnGauge("step", "Last training step seen.", TRAINING_LABELS)
LAST_RECORD = OwnGauge(
    "last_record_timestamp_seconds",
    "Wall time (Unix seconds, trainer clock) of the latest record the training code made; "
    "heartbeats do not count.",
    TRAINING_LABELS,
)
NONFINITE = OwnCounter(
    "nonfinite_values", "Scalar values that were NaN or infinite.", TRAINING_LABELS
)

# the series cap
SERIES = OwnGauge("series", "Series this sink exports now.")
SERIES_LIMIT = OwnGauge("series_limit", "Most series this sink exports (its max_series option).")
SERIES_REFUSED = OwnCounter(
    "series_refused",
    "Values not exported: a new series past max_series (series_cap), or a metric name another "
    "metric already took (name_conflict).",
    ("reason",),
)

# the agent's health (AgentHealth)
MESSAGES_RECEIVED = OwnCounter(
    "agent_messages_received", "Messages the agent received from probes, rejected ones included."
)
RECORDS_RECEIVED = OwnCounter("agent_records_received", "Records the agent accepted and stored.")
BYTES_RECEIVED = OwnCounter("agent_received_bytes", "Bytes of messages the agent received.")
MESSAGES_REJECTED = OwnCounter(
    "agent_messages_rejected", "Messages the agent rejected whole, by reason.", ("reason",)
)
RECORDS_REJECTED = OwnCounter(
    "agent_records_rejected", "Records the agent rejected, by reason.", ("reason",)
)
PROBE_RECEIVED = OwnCounter(
    "probe_records_received", "Records the agent received from a rank.", TRAINING_LABELS
)
PROBE_DROPPED = OwnCounter(
    "probe_records_dropped",
    "Records a rank's probe dropped (as it reports them), by reason.",
    (*TRAINING_LABELS, "reason"),
)
PROBE_LOST = OwnGauge(
    "probe_records_lost",
    "Records of a rank neither received nor reported dropped; may include records in flight "
    "until the rank says bye.",
    TRAINING_LABELS,
)
SINK_EXPORTED = OwnCounter("sink_exported_entries", "Entries a sink exported.", ("sink",))
SINK_FAILURES = OwnCounter("sink_failures", "Failed export or flush calls of a sink.", ("sink",))
SINK_RETRIES = OwnCounter("sink_retries", "Export retries of a sink.", ("sink",))
SINK_DROPPED = OwnCounter(
    "sink_dropped_entries", "Entries a sink dropped, by reason.", ("sink", "reason")
)
SINK_QUEUE_DEPTH = OwnGauge("sink_queue_depth", "Batches waiting in a sink's queue.", ("sink",))
SINK_UP = OwnGauge("sink_up", "1 when a sink's health is ok, else 0.", ("sink",))
SINK_HEALTH = OwnGauge(
    "sink_health",
    "A sink's health: 1 for its current state, 0 for the others.",
    ("sink", "state"),
)
STAT_JOB_DURATION = OwnSummary(
    "stat_job_duration_seconds", "Time the agent's statistics jobs took, by job.", ("job",)
)
ALERTS_FIRED = OwnCounter(
    "alerts",
    "Alerts the agent's alert engine fired (after cooldowns), by alert and severity.",
    ("alert", "severity"),
)
ANALYSIS_DROPPED = OwnCounter(
    "analysis_dropped_batches",
    "Batches the agent's statistics could not keep up with (the run store has them).",
)
ALERTS_ACTIVE = OwnGauge(
    "alerts_active",
    "Alerts the agent's alert engine holds active, by alert, severity and run.",
    ("alert", "severity", "run"),
)

#: system entry field -> (gauge, factor to the base unit)
HOST_METRICS: tuple[tuple[str, OwnGauge, float], ...] = (
    (
        "cpu_percent",
        OwnGauge(
            "host_cpu_utilization_ratio",
            "Share of the host's CPU time spent busy over the last sample interval (0-1).",
            HOST_LABELS,
        ),
        0.01,
    ),
    ("cpu_count", OwnGauge("host_cpus", "Logical CPUs of the host.", HOST_LABELS), 1.0),
    ("load1", OwnGauge("host_load1", "Host load average over 1 minute.", HOST_LABELS), 1.0),
    (
        "memory_used_bytes",
        OwnGauge("host_memory_used_bytes", "Host memory in use (bytes).", HOST_LABELS),
        1.0,
    ),
    (
        "memory_total_bytes",
        OwnGauge("host_memory_total_bytes", "Host memory in total (bytes).", HOST_LABELS),
        1.0,
    ),
    (
        "memory_available_bytes",
        OwnGauge(
            "host_memory_available_bytes",
            "Host memory available to new allocations without swapping (bytes).",
            HOST_LABELS,
        ),
        1.0,
    ),
    (
        "swap_used_bytes",
        OwnGauge("host_swap_used_bytes", "Host swap in use (bytes).", HOST_LABELS),
        1.0,
    ),
    (
        "disk_read_bytes_per_s",
        OwnGauge(
            "host_disk_read_bytes_per_second",
            "Bytes read from the host's disks per second over the last sample interval.",
            HOST_LABELS,
        ),
        1.0,
    ),
    (
        "disk_write_bytes_per_s",
        OwnGauge(
            "host_disk_written_bytes_per_second",
            "Bytes written to the host's disks per second over the last sample interval.",
            HOST_LABELS,
        ),
        1.0,
    ),
    (
        "net_recv_bytes_per_s",
        OwnGauge(
            "host_network_receive_bytes_per_second",
            "Bytes received per second on the host's network interfaces but loopback.",
            HOST_LABELS,
        ),
        1.0,
    ),
    (
        "net_sent_bytes_per_s",
        OwnGauge(
            "host_network_transmit_bytes_per_second",
            "Bytes sent per second on the host's network interfaces but loopback.",
            HOST_LABELS,
        ),
        1.0,
    ),
)

#: trainer-process field -> (gauge, factor to the base unit)
PROCESS_METRICS: tuple[tuple[str, OwnGauge, float], ...] = (
    (
        "cpu_percent",
        OwnGauge(
            "process_cpu_cores",
            "CPU cores a trainer process and its children kept busy over the last sample "
            "interval (1 = one core).",
            PROCESS_LABELS,
        ),
        0.01,
    ),
    (
        "rss_bytes",
        OwnGauge(
            "process_resident_memory_bytes",
            "Resident memory of a trainer process plus its children (bytes; pages they share "
            "are counted in each).",
            PROCESS_LABELS,
        ),
        1.0,
    ),
    (
        "threads",
        OwnGauge(
            "process_threads", "Threads of a trainer process and its children.", PROCESS_LABELS
        ),
        1.0,
    ),
    (
        "children",
        OwnGauge(
            "process_children", "Live descendant processes of a trainer process.", PROCESS_LABELS
        ),
        1.0,
    ),
)


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


class AgentStatsCollector(Collector):
    """The agent's health (``context.agent_stats()``), read at scrape time."""

    def __init__(self, prefix: str, stats: Callable[[], AgentHealth | None] | None) -> None:
        self.prefix = prefix
        self.stats = stats
        self._last_error_log = -math.inf

    def collect(self) -> Iterator[Metric]:
        if self.stats is None:
            return iter(())
        try:
            health = self.stats()
            if health is None:
                return iter(())
            return iter(list(self._metrics(health)))
        except Exception as exc:  # a scrape must not fail because of the agent's stats
            now = time.monotonic()
            if now - self._last_error_log >= 60:
                self._last_error_log = now
                logger.warning("outrider prometheus sink: cannot read agent stats: %r", exc)
            return iter(())

    def _metrics(self, health: AgentHealth) -> Iterable[Metric]:
        p = self.prefix
        yield MESSAGES_RECEIVED.family(p, health.messages)
        yield RECORDS_RECEIVED.family(p, health.records)
        yield BYTES_RECEIVED.family(p, health.bytes)
        yield _by_reason(MESSAGES_REJECTED.family(p), health.rejected_messages)
        yield _by_reason(RECORDS_REJECTED.family(p), health.rejected_records)
        yield from self._streams(health.runs or {})
        yield from self._sinks(health.sinks)
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

    def _streams(self, runs: Mapping[str, Sequence[StreamHealth]]) -> Iterable[Metric]:
        """Per-stream ledgers summed per (run, rank, host): a restarted rank has two streams."""
        p = self.prefix
        received: dict[Labels, int] = {}
        lost: dict[Labels, int] = {}
        dropped: dict[Labels, int] = {}
        for run, streams in runs.items():
            for stream in streams:
                key: Labels = (run, str(stream.rank), stream.host)
                received[key] = received.get(key, 0) + stream.received
                lost[key] = lost.get(key, 0) + stream.lost
                for reason, n in stream.dropped.items():
                    reason_key: Labels = (*key, reason)
                    dropped[reason_key] = dropped.get(reason_key, 0) + n
        received_metric = PROBE_RECEIVED.family(p)
        dropped_metric = PROBE_DROPPED.family(p)
        lost_metric = PROBE_LOST.family(p)
        for key, n in sorted(received.items()):
            received_metric.add_metric(key, n)
            lost_metric.add_metric(key, lost[key])
        for reason_key, n in sorted(dropped.items()):
            dropped_metric.add_metric(reason_key, n)
        return received_metric, dropped_metric, lost_metric

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
