"""The agent's YAML configuration: validated, with errors that name the key and the line.

Every sink listed under ``sinks`` is configured by its own options (checked
against the sink's ``Options`` model) plus a few keys the agent itself
handles for every sink (``enabled``, ``class``, ``queue_size``, ``retries``).
The default sinks are on unless a config switches them off with
``enabled: false``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml

from agent.aggregation.config import AggregationSettings
from agent.alerts.config import DEFAULT_ALERTS_YAML, AlertsConfig
from agent.yamltext import SAFE_LOADER
from sinks import registry

DEFAULT_SINKS = ("tensorboard", "prometheus", "wandb")

DEFAULT_YAML = """\
# outrider agent configuration (outrider agent --config FILE, outrider run --config FILE).
# Every key is optional; these are the defaults.

# Where runs are stored; the command line's --runs-dir wins over this.
runs_dir: outrider-runs

# Seconds the agent keeps storing after SIGTERM/SIGINT before it exits.
drain_timeout: 5.0

# Seconds all sinks together may take to flush and close at exit; a sink still
# busy then (a hung upload) is abandoned and what it held is counted as dropped.
sink_close_timeout: 30.0

# Bins of the histograms the agent computes from probe.histogram samples.
histogram_bins: 64

# Distinct metric names per run that the statistics, alerts and sinks track in
# memory; values of later names are only in the run store (counted, and alerted
# once per run as too_many_metrics).
max_metric_names: 10000

# The agent runs beside the trainer and must lose every contest for a core:
# its niceness is raised by this much at start (0-19; W&B's service inherits it).
nice: 10

# Expensive statistics (docs/statistics.md), on workers below the agent's own priority.
stats:
  enabled: true
  threads: 1                # worker processes, and the agent's BLAS/OpenMP threads
  nice: 5                   # worker processes: added on top of the agent's niceness
  idle: true                # worker processes in SCHED_IDLE (Linux): only idle cycles
  cpu_share: 0.01           # most of one core each kind of job may use on average (0: no cap)
  gil_share: 0.25           # most of the agent's Python time the analysis thread may take
  processes: true           # run statistics jobs in worker processes (no GIL contention)
  window_steps: 100         # window summaries and step-time percentiles every N steps
  feature_map: tsne         # tsne, pca or off: 2-d maps of probe.features batches
  map_every: 5              # a map for every Nth features batch of a stream
  map_points: 1000          # rows a map is computed on (t-SNE is O(n log n))
  dashboard_seconds: 120    # a training-dashboard image this often (0: never)
  close_timeout: 10         # seconds at exit for the last windows, maps and dashboard

# Host, trainer-process and GPU sampling (docs/system.md).
system:
  enabled: true
  interval: 1.0             # seconds

# The live web dashboard (docs/dashboard.md), served read-only by a process of its own.
dashboard:
  enabled: true
  host: 127.0.0.1           # loopback only unless you say otherwise (then a token is required)
  port: 8080                # in use: one warning, and the agent goes on without a dashboard
  token: null               # or env OUTRIDER_DASHBOARD_TOKEN; pages open as /?token=TOKEN

# The job tier (docs/aggregation.md): node agents forward to one job aggregator.
aggregation:
  forward_to: null          # HOST:PORT of the aggregator (`outrider run` fills it for torchrun)
  bind: 127.0.0.1:29460     # where `outrider aggregator` listens
  keys_dir: null            # CURVE keys from `outrider keys` (required off loopback)
  insecure: false           # plain TCP off loopback: a trusted network only
  backlog: 10000            # items a node holds while the aggregator is away
  spool_dir: null           # spill the backlog's overflow to disk here
  spool_bytes: 67108864
  heartbeat_seconds: 2.0
  accounting_seconds: 5.0   # how often a node sends its streams' accounting
  forward_raw: false        # also forward every scalar line (small jobs only)
  window_wait_seconds: 30   # how long the aggregator waits for every rank's window
  stragglers:               # flagged when a score < threshold for `consecutive` windows
    enabled: true
    threshold: 0.75         # relative: fastest median / own; individual: own best / own now
    consecutive: 3
    floor_seconds: 0.002    # added to every time: sub-millisecond timer noise flags nobody
    sections: [compute_seconds, forward_seconds, step_time_seconds]  # first one all ranks log
  divergence:               # a rank whose window mean departs from the other ranks'
    enabled: true
    metrics: [loss, grad_norm]
    threshold: 6.0          # robust deviations (MAD) from the other ranks' median
    consecutive: 2

# Destinations besides the run store (which is always on). The three below are
# on by default; switch one off with `enabled: false`. Keys every sink takes:
#   enabled (bool), class ("module:Class" for your own sink),
#   queue_size (batches held while the sink is slow), retries (per batch).
sinks:
  tensorboard:
    enabled: true
    # logdir: null            # default: <run dir>/tensorboard
    flush_secs: 2
  prometheus:
    enabled: true
    host: 127.0.0.1           # loopback only unless you say otherwise
    port: 9400                # /metrics
    max_series: 10000
  wandb:
    enabled: true
    project: outrider
    mode: auto                # online with an API key, offline without
    rows_per_second: 0.2      # most W&B history rows a second, steps between folded (0: all)
"""
DEFAULT_YAML += "\n# Alert rules and where alerts go (docs/alerts.md).\n" + DEFAULT_ALERTS_YAML


class ConfigError(ValueError):
    """A bad config file; the message has ``file:line: key: problem`` lines."""


class SinkSettings(pydantic.BaseModel):
    """The keys the agent handles for every sink; the rest are the sink's options."""

    model_config = pydantic.ConfigDict(extra="allow", populate_by_name=True)

    enabled: bool = True
    class_: str | None = pydantic.Field(default=None, alias="class")
    queue_size: int = pydantic.Field(default=1000, gt=0)
    retries: int = pydantic.Field(default=3, ge=0)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class StatsSettings(pydantic.BaseModel):
    """The statistics engine's share of the CPU and how often it draws maps and dashboards."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    threads: int = pydantic.Field(default=1, ge=1, le=64)
    nice: int = pydantic.Field(default=5, ge=0, le=19)
    idle: bool = True
    cpu_share: float = pydantic.Field(default=0.01, ge=0, le=1)
    gil_share: float = pydantic.Field(default=0.25, gt=0, le=1)
    processes: bool = True
    window_steps: int = pydantic.Field(default=100, ge=1)
    feature_map: Literal["tsne", "pca", "off"] = "tsne"
    map_every: int = pydantic.Field(default=5, ge=1)
    map_points: int = pydantic.Field(default=1000, ge=10, le=20000)
    dashboard_seconds: float = pydantic.Field(default=120.0, ge=0)
    close_timeout: float = pydantic.Field(default=10.0, ge=0)

    @pydantic.field_validator("feature_map", mode="before")
    @classmethod
    def _unquoted_off(cls, value: Any) -> Any:
        """YAML reads a bare `off` as false."""
        return "off" if value is False else value


class SystemSettings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    interval: float = pydantic.Field(default=1.0, gt=0)


class DashboardSettings(pydantic.BaseModel):
    """Where the live dashboard listens; off loopback it needs a token."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = pydantic.Field(default=8080, ge=0, le=65535)
    token: str | None = pydantic.Field(default=None, min_length=8)


class AgentConfig(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    runs_dir: Path | None = None
    drain_timeout: float = pydantic.Field(default=5.0, ge=0)
    sink_close_timeout: float = pydantic.Field(default=30.0, ge=0)
    histogram_bins: int = pydantic.Field(default=64, gt=1, le=512)
    max_metric_names: int = pydantic.Field(default=10_000, ge=1)
    nice: int = pydantic.Field(default=10, ge=0, le=19)
    stats: StatsSettings = pydantic.Field(default_factory=StatsSettings)
    system: SystemSettings = pydantic.Field(default_factory=SystemSettings)
    alerts: AlertsConfig = pydantic.Field(default_factory=AlertsConfig)
    aggregation: AggregationSettings = pydantic.Field(default_factory=AggregationSettings)
    dashboard: DashboardSettings = pydantic.Field(default_factory=DashboardSettings)
    sinks: dict[str, SinkSettings] = pydantic.Field(default_factory=dict)

    def only_sinks(self, names: list[str]) -> AgentConfig:
        """A copy with exactly ``names`` enabled (options kept from this config)."""
        unknown = [name for name in names if not self.knows_sink(name)]
        if unknown:
            raise ConfigError(
                f"unknown sink {', '.join(unknown)}; known: {', '.join(registry.known_names())}"
            )
        sinks = {}
        for name in set(DEFAULT_SINKS) | set(self.sinks) | set(names):
            settings = self.sinks.get(name, SinkSettings()).model_copy()
            settings.enabled = name in names
            sinks[name] = settings
        return self.model_copy(update={"sinks": sinks})

    def knows_sink(self, name: str) -> bool:
        """A built-in or registered sink, or one this config names (a class of its own)."""
        return name in self.sinks or name in registry.known_names()

    def enabled_sinks(self) -> dict[str, SinkSettings]:
        """Defaults plus the file's sinks, minus the switched-off ones."""
        merged = {name: SinkSettings() for name in DEFAULT_SINKS}
        merged.update(self.sinks)
        return {name: settings for name, settings in merged.items() if settings.enabled}


@dataclass
class _Located:
    data: Any
    root: yaml.Node | None


def _compose(text: str, source: str) -> _Located:
    try:
        root = yaml.compose(text, Loader=SAFE_LOADER)
        data = yaml.load(text, Loader=SAFE_LOADER)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None
    return _Located(data if data is not None else {}, root)


def _line_of(root: yaml.Node | None, path: tuple[Any, ...]) -> int | None:
    """1-based line of the node at ``path`` (or of its deepest existing parent)."""
    node = root
    line = node.start_mark.line + 1 if node is not None else None
    for key in path:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == str(key):
                    node = value_node
                    line = key_node.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def parse(text: str, source: str = "<config>", sinks: list[str] | None = None) -> AgentConfig:
    """Parse and validate a config, including every enabled sink's own options; with
    ``sinks`` (``--sinks``), the options of those sinks only: a sink that will not run is
    not imported to check them."""
    located = _compose(text, source)
    if not isinstance(located.data, dict):
        raise ConfigError(f"{source}:1: the config must be a mapping of keys to values")
    problems: list[str] = []
    try:
        config = AgentConfig.model_validate(located.data)
    except pydantic.ValidationError as exc:
        for error in exc.errors():
            path = tuple(error["loc"])
            problems.append(_problem(source, located.root, path, error["msg"]))
        raise ConfigError("\n".join(problems)) from None
    for name, settings in _sinks_to_check(config, sinks).items():
        try:
            registry.validate_options(name, settings.options(), settings.class_)
        except registry.SinkConfigError as exc:
            for option_path, message in exc.problems:
                path = ("sinks", name, *option_path)
                problems.append(_problem(source, located.root, path, message))
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def _sinks_to_check(config: AgentConfig, only: list[str] | None) -> dict[str, SinkSettings]:
    """The enabled sinks, or the named ones (unknown names are only_sinks' to report)."""
    if only is None:
        return config.enabled_sinks()
    return {
        name: config.sinks.get(name, SinkSettings()) for name in only if config.knows_sink(name)
    }


def _problem(source: str, root: yaml.Node | None, path: tuple[Any, ...], message: str) -> str:
    line = _line_of(root, path)
    key = ".".join(str(part) for part in path) or "(top level)"
    return f"{source}:{line or 1}: {key}: {message}"


def load(path: Path | None, sinks: list[str] | None = None) -> AgentConfig:
    """The config in ``path``, or the defaults when there is none; ``sinks`` as in parse."""
    if path is None:
        return AgentConfig()
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    return parse(text, str(path), sinks)
