"""The Prometheus sink's own metric families, and the names it takes from the agent's samples.

Every family the sink exposes itself is declared here once, as an
``OwnMetric``: declaring one reserves its name, so a user metric that would
take it goes under ``<prefix>_user_`` and no scrape holds two families of one
name. Host, trainer-process and GPU fields map to their gauges here too (the
GPU ones under the DCGM exporter's names, units and labels).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

Labels = tuple[str, ...]

TRAINING_LABELS: Labels = ("run", "rank", "host")
GPU_LABELS = ("gpu", "UUID", "device", "modelName", "Hostname")  # the DCGM exporter's


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
RECORDS_RECEIVED = OwnCounter(
    "agent_records_received",
    "Records the agent accepted (stored, or counted as not stored when the disk refused them).",
)
BYTES_RECEIVED = OwnCounter("agent_received_bytes", "Bytes of messages the agent received.")
MESSAGES_REJECTED = OwnCounter(
    "agent_messages_rejected", "Messages the agent rejected whole, by reason.", ("reason",)
)
RECORDS_REJECTED = OwnCounter(
    "agent_records_rejected", "Records the agent rejected, by reason.", ("reason",)
)
METRIC_VALUES_OVER_CAP = OwnCounter(
    "agent_metric_values_over_cap",
    "Scalar values the agent's statistics and sinks did not get: their metric name came past "
    "the run's max_metric_names distinct names (the run store has them).",
)
# the job tier (TierHealth)
UPLINK_CONNECTED = OwnGauge(
    "uplink_connected", "1 while this node agent's job aggregator is reachable, else 0."
)
UPLINK_ITEMS = OwnCounter(
    "uplink_items", "Items this node agent made for the job aggregator, dropped ones included."
)
UPLINK_BACKLOG = OwnGauge(
    "uplink_backlog_items", "Items waiting for the job aggregator (memory and spool)."
)
UPLINK_DROPPED = OwnCounter(
    "uplink_items_dropped",
    "Items for the job aggregator this node dropped, by reason.",
    ("reason",),
)
HANDSHAKE_FAILURES = OwnCounter(
    "tier_handshake_failures",
    "CURVE handshakes between node agents and the job aggregator that failed (a wrong or "
    "missing key).",
)
AGGREGATOR_NODES = OwnGauge("aggregator_nodes", "Node agents this job aggregator heard from.")
PROBE_RECEIVED = OwnCounter(
    "probe_records_received", "Records the agent received from a rank.", TRAINING_LABELS
)
PROBE_DROPPED = OwnCounter(
    "probe_records_dropped",
    "Records a rank's probe dropped (as it reports them), by reason.",
    (*TRAINING_LABELS, "reason"),
)
PROBE_NOT_STORED = OwnCounter(
    "probe_records_not_stored",
    "Records of a rank the agent received but its run store could not keep (store_full: no "
    "space; store_error: read-only, I/O error, directory gone), by reason.",
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
