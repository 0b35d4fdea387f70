"""The alert engine: rules over a run's metrics and events, with cooldowns and destinations.

The agent's analysis thread feeds it samples (``observe``), non-numeric events
(``observe_event``) and a tick about once a second (``tick``); it takes back the
alerts fired since the last call (``take_fired``). Everything is evaluated on
that one thread, so a rule never delays the training job or the run store; the
only threads here are the webhook senders (``agent/alerts/webhooks.py``).

Rule kinds live in ``agent/alerts/rules.py``; this module holds the ``alerts:``
config section (``AlertsConfig``, ``DEFAULT_ALERTS_YAML``), the built-in rules
and the engine's bookkeeping: per-key state under a hard cap, cooldowns,
which alerts are active, and delivery to ``log`` and webhooks. ``store`` and
``sinks`` are names the integrator acts on.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Self, TypeVar

import pydantic

from agent.alerts import rules as alert_rules
from agent.alerts.rules import AnySpec, RankInfo, Rule, Severity
from agent.alerts.webhooks import WebhookSender, validate_url

logger = logging.getLogger("outrider.alerts")

BUILTIN_DESTINATIONS = ("log", "store", "sinks")
DEFAULT_DESTINATIONS = ["log", "store", "sinks"]
MAX_STATE_KEYS = 10_000
MAX_FIRED = 10_000  # alerts waiting for take_fired; the oldest are dropped (counted) past it
MATCH_CACHE_LIMIT = 20_000  # metric names whose matching rules are remembered
ENDED_RUNS_LIMIT = 1_000
PRUNE_SECONDS = 60.0
LOG_LEVELS = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

T = TypeVar("T")
StateKey = tuple[str, str, int, str]  # rule, run, rank, metric
AlertKey = tuple[str, str, int, str]  # rule, run, rank, metric for pattern rules ("" otherwise)

# -- built-in rules ---------------------------------------------------------------------------
_WHERE = "(run {run}, rank {rank}, step {step})"

BUILTIN_RULES: Mapping[str, Mapping[str, Any]] = {
    # Only what differs from the kind's defaults; DEFAULT_ALERTS_YAML shows every field.
    "nonfinite": {
        "type": "nonfinite",
        "metric": ["loss", "val/loss", "grad_norm"],
        "flags": ["loss_nonfinite", "grad_nonfinite"],
        "severity": "critical",
        "message": "non-finite loss or gradients: {metric}={value} " + _WHERE,
    },
    "loss_spike": {
        "type": "zscore",
        "metric": "loss",
        "log": True,
        "min_std": 0.01,
        "message": "loss spike: {metric}={value:.4g} is {zscore:.1f} standard deviations above "
        "its moving mean {mean:.4g} " + _WHERE,
    },
    "grad_explosion": {
        "type": "zscore",
        "metric": "grad_norm",
        "z": 5.0,
        "log": True,
        "min_std": 0.05,
        "above": 10000.0,
        "severity": "error",
        "message": "gradient explosion: {metric}={value:.4g} (moving mean {mean:.4g}, "
        "z {zscore:.1f}, limit {threshold:.4g}) " + _WHERE,
    },
    "grad_vanishing": {
        "type": "threshold",
        "metric": "grad_norm",
        "below": 1e-7,
        "for_steps": 100,
        "cooldown": 1800.0,
        "message": "vanishing gradients: {metric}={value:.3g} has stayed below {threshold:.3g} "
        + _WHERE,
    },
    "loss_plateau": {
        "type": "plateau",
        "metric": "val/loss",
        "fallback_metric": "loss",
        "severity": "info",
        "cooldown": 1800.0,
        "message": "loss plateau: {metric} has not improved on its best {best:.4g} for "
        "{bad_evaluations} evaluations; ReduceLROnPlateau would lower the learning rate now "
        + _WHERE,
    },
    "overfitting": {
        "type": "overfitting",
        "metric": "val/loss",
        "cooldown": 3600.0,
        "message": "overfitting: {metric} rose {rise:.1%} over the last {evaluations} "
        "evaluations while {train_metric} fell " + _WHERE,
    },
    "representation_collapse": {
        "type": "collapse",
        "metric": ["features/*/effective_rank", "features/*/collapse_ratio"],
        "severity": "error",
        "cooldown": 1800.0,
        "message": "representation collapse: {metric}={value:.3g} is below {threshold:.3g} "
        + _WHERE,
    },
    "memory_leak": {
        "type": "trend",
        "metric": ["system/process/*/rss_bytes", "cuda_memory_allocated_bytes"],
        "slope_above": 65536.0,
        "cooldown": 3600.0,
        "message": "memory leak? {metric} grew {growth:.1%} ({slope:.3g} bytes/s) over the "
        "last {window_seconds:.0f} s, now {value:.4g} bytes (run {run}, rank {rank})",
    },
    "gpu_temperature": {
        "type": "threshold",
        "metric": "system/gpu*/temperature_c",
        "above": 85.0,
        "for_seconds": 60.0,
        "cooldown": 900.0,
        "message": "GPU too hot: {metric}={value:.0f} C has stayed above {threshold:.0f} C "
        "(run {run})",
    },
    "gpu_power": {
        "type": "threshold",
        "metric": "system/gpu*/power_watts",
        "for_seconds": 300.0,
        "limit_metric": "power_limit_watts",
        "limit_fraction": 0.98,
        "severity": "info",
        "cooldown": 1800.0,
        "message": "GPU at its power cap: {metric}={value:.0f} W has stayed above "
        "{threshold:.0f} W (run {run})",
    },
    "input_bound": {
        "type": "input_bound",
        "metric": "data_wait_seconds",
        "cooldown": 1800.0,
        "message": "input bound: rank {worst_rank} waits for data {wait_fraction:.0%} of each "
        "step while GPU utilisation is at most {util:.0f}% (run {run})",
    },
    "stalled": {
        "type": "stalled",
        "severity": "error",
        "cooldown": 1800.0,
        "message": "run stalled: no record from run {run} rank {rank} for {value:.0f} s",
    },
    "run_died": {
        "type": "run_died",
        "severity": "critical",
        "cooldown": 600.0,
        "message": "run died: run {run} rank {rank} ended without a bye ({reason}, exit status "
        "{exit_status}, pid {pid})",
    },
    "probe_drops": {
        "type": "probe_drops",
        "cooldown": 600.0,
        "message": "the probe of run {run} rank {rank} dropped records: {reasons}",
    },
    "sink_failed": {
        "type": "event",
        "event": "sink_failed",
        "key_attr": "sink",
        "severity": "error",
        "message": "sink {source} failed: {detail} (run {run})",
        "destinations": ["log", "store"],
    },
    "series_cap": {
        "type": "event",
        "event": "series_cap",
        "cooldown": 3600.0,
        "message": "{detail}",
    },
}

DEFAULT_ALERTS_YAML = """\
# Alerts: rules over each run's metrics and events (docs/alerts.md). A built-in rule
# is changed by naming it and giving the keys to change (`enabled: false` turns it
# off); a new rule needs a new name, `type` and its fields. Every rule takes
# severity (info|warning|error|critical), cooldown (seconds before the same rule
# fires again for the same run/rank/metric), message (str.format template),
# destinations (default: default_destinations) and enabled. These are the defaults.
alerts:
  enabled: true
  default_destinations: [log, store, sinks]
  max_state_keys: 10000       # (rule, run, rank, metric) slots; new ones past it are refused
  destinations: {}            # e.g. {ops: {type: webhook, url: "https://...", format: slack}}
  rules:
    # NaN/inf loss or gradient norm, or the probe's *_nonfinite flags set.
    nonfinite:
      type: nonfinite
      metric: [loss, val/loss, grad_norm]
      flags: [loss_nonfinite, grad_nonfinite]
      severity: critical
      cooldown: 300.0
      message: "non-finite loss or gradients: {metric}={value} (run {run}, rank {rank}, step
        {step})"
      destinations: null
      enabled: true
    # log(loss) more than z moving standard deviations above its moving mean.
    loss_spike:
      type: zscore
      metric: loss
      z: 4.0
      alpha: 0.02              # weight of each new sample in the moving mean/variance
      warmup: 50               # samples before it can fire
      log: true
      direction: up
      min_std: 0.01            # floor of the moving std (of log loss: ~1%)
      above: null              # an absolute bound that fires at any time
      severity: warning
      cooldown: 300.0
      message: "loss spike: {metric}={value:.4g} is {zscore:.1f} standard deviations above its
        moving mean {mean:.4g} (run {run}, rank {rank}, step {step})"
      destinations: null
      enabled: true
    # grad_norm above an absolute bound, or log(grad_norm) z-score above z.
    grad_explosion:
      type: zscore
      metric: grad_norm
      z: 5.0
      alpha: 0.02
      warmup: 50
      log: true
      direction: up
      min_std: 0.05
      above: 10000.0
      severity: error
      cooldown: 300.0
      message: "gradient explosion: {metric}={value:.4g} (moving mean {mean:.4g}, z {zscore:.1f},
        limit {threshold:.4g}) (run {run}, rank {rank}, step {step})"
      destinations: null
      enabled: true
    # grad_norm below a floor for a span of for_steps steps.
    grad_vanishing:
      type: threshold
      metric: grad_norm
      above: null
      below: 1.0e-7
      for_steps: 100
      for_seconds: 0.0
      limit_metric: null
      limit_fraction: null
      severity: warning
      cooldown: 1800.0
      message: "vanishing gradients: {metric}={value:.3g} has stayed below {threshold:.3g} (run
        {run}, rank {rank}, step {step})"
      destinations: null
      enabled: true
    # ReduceLROnPlateau's bookkeeping on val/loss (on means of 100 train losses
    # while a run logs no val/loss); fires where it would lower the learning rate.
    loss_plateau:
      type: plateau
      metric: val/loss
      fallback_metric: loss
      mode: min
      patience: 10             # evaluations without improvement tolerated
      threshold: 1.0e-4
      threshold_mode: rel      # better means < best * (1 - threshold)
      cooldown_evaluations: 0
      window: 1                # samples of metric averaged into one evaluation
      fallback_window: 100     # samples of fallback_metric averaged into one evaluation
      severity: info
      cooldown: 1800.0
      message: "loss plateau: {metric} has not improved on its best {best:.4g} for
        {bad_evaluations} evaluations; ReduceLROnPlateau would lower the learning rate now (run
        {run}, rank {rank}, step {step})"
      destinations: null
      enabled: true
    # Least-squares slope of the last 5 val/loss values > 0 (a fitted rise of at
    # least min_rise of their mean) while the train loss's slope is < 0.
    overfitting:
      type: overfitting
      metric: val/loss
      train_metric: loss
      evaluations: 5
      min_rise: 0.01
      severity: warning
      cooldown: 3600.0
      message: "overfitting: {metric} rose {rise:.1%} over the last {evaluations} evaluations
        while {train_metric} fell (run {run}, rank {rank}, step {step})"
      destinations: null
      enabled: true
    # A feature stream's effective rank or collapse ratio below its floor.
    representation_collapse:
      type: collapse
      metric: [features/*/effective_rank, features/*/collapse_ratio]
      effective_rank_below: 2.0
      collapse_ratio_below: 0.1
      for_steps: 1
      severity: error
      cooldown: 1800.0
      message: "representation collapse: {metric}={value:.3g} is below {threshold:.3g} (run {run},
        rank {rank}, step {step})"
      destinations: null
      enabled: true
    # Memory growing all through a 15-minute window (slope in bytes/s, growth
    # as a fraction of the fitted starting value), after 5 minutes of warm-up.
    memory_leak:
      type: trend
      metric: [system/process/*/rss_bytes, cuda_memory_allocated_bytes]
      slope_above: 65536.0
      min_growth_fraction: 0.05
      window_seconds: 900.0
      warmup_seconds: 300.0
      buckets: 60
      severity: warning
      cooldown: 3600.0
      message: "memory leak? {metric} grew {growth:.1%} ({slope:.3g} bytes/s) over the last
        {window_seconds:.0f} s, now {value:.4g} bytes (run {run}, rank {rank})"
      destinations: null
      enabled: true
    gpu_temperature:
      type: threshold
      metric: system/gpu*/temperature_c
      above: 85.0
      below: null
      for_steps: 1
      for_seconds: 60.0
      limit_metric: null
      limit_fraction: null
      severity: warning
      cooldown: 900.0
      message: "GPU too hot: {metric}={value:.0f} C has stayed above {threshold:.0f} C (run {run})"
      destinations: null
      enabled: true
    # Power above 98% of the GPU's system/gpu<i>/power_limit_watts for 5 minutes;
    # set `above` (watts) for GPUs whose samples carry no power limit.
    gpu_power:
      type: threshold
      metric: system/gpu*/power_watts
      above: null
      below: null
      for_steps: 1
      for_seconds: 300.0
      limit_metric: power_limit_watts
      limit_fraction: 0.98
      severity: info
      cooldown: 1800.0
      message: "GPU at its power cap: {metric}={value:.0f} W has stayed above {threshold:.0f} W
        (run {run})"
      destinations: null
      enabled: true
    # Busiest GPU under 50% while a rank waits for data > 30% of its step time.
    input_bound:
      type: input_bound
      metric: data_wait_seconds
      step_time_metric: step_time_seconds
      util_metric: system/gpu*/util_percent
      util_below: 50.0
      wait_fraction_above: 0.3
      smoothing: 0.1           # moving average of each rank's wait fraction
      for_seconds: 120.0
      severity: warning
      cooldown: 1800.0
      message: "input bound: rank {worst_rank} waits for data {wait_fraction:.0%} of each step
        while GPU utilisation is at most {util:.0f}% (run {run})"
      destinations: null
      enabled: true
    # No record from a rank (that has not said bye) for after_seconds.
    stalled:
      type: stalled
      after_seconds: 300.0
      severity: error
      cooldown: 1800.0
      message: "run stalled: no record from run {run} rank {rank} for {value:.0f} s"
      destinations: null
      enabled: true
    # Trainer process gone (no bye within grace_seconds), or run_end with a failure.
    run_died:
      type: run_died
      grace_seconds: 5.0
      severity: critical
      cooldown: 600.0
      message: "run died: run {run} rank {rank} ended without a bye ({reason}, exit status
        {exit_status}, pid {pid})"
      destinations: null
      enabled: true
    probe_drops:
      type: probe_drops
      severity: warning
      cooldown: 600.0
      message: "the probe of run {run} rank {rank} dropped records: {reasons}"
      destinations: null
      enabled: true
    # A sink's failure; not sent back to the sinks (one of them is failing).
    sink_failed:
      type: event
      event: sink_failed
      key_attr: sink
      severity: error
      cooldown: 300.0
      message: "sink {source} failed: {detail} (run {run})"
      destinations: [log, store]
      enabled: true
    series_cap:
      type: event
      event: series_cap
      key_attr: null
      severity: warning
      cooldown: 3600.0
      message: "{detail}"
      destinations: null
      enabled: true
"""


# -- config ---------------------------------------------------------------------------------------
class WebhookDestination(pydantic.BaseModel):
    """An HTTP(S) endpoint that gets each alert as JSON or as a Slack message."""

    model_config = pydantic.ConfigDict(extra="forbid")

    type: Literal["webhook"]
    url: str
    format: Literal["json", "slack"] = "json"
    timeout_seconds: float = pydantic.Field(default=5.0, gt=0, le=300)
    headers: dict[str, str] = pydantic.Field(default_factory=dict)
    queue_size: int = pydantic.Field(default=100, ge=1, le=100_000)

    @pydantic.field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return validate_url(value)

    @pydantic.field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not name or any(ch in name for ch in " :\r\n") or any(ch in item for ch in "\r\n"):
                raise ValueError(f"header {name!r}: names are tokens; values have no line breaks")
        return value


RuleConfig = Annotated[AnySpec, pydantic.Field(discriminator="type")]


class AlertsConfig(pydantic.BaseModel):
    """The ``alerts:`` section of the agent's YAML; ``rules`` always holds every built-in."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    default_destinations: list[str] = pydantic.Field(
        default_factory=lambda: list(DEFAULT_DESTINATIONS)
    )
    destinations: dict[str, WebhookDestination] = pydantic.Field(default_factory=dict)
    rules: dict[str, RuleConfig] = pydantic.Field(default_factory=dict)
    max_state_keys: int = pydantic.Field(default=MAX_STATE_KEYS, ge=1)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _with_builtins(cls, data: Any) -> Any:
        """Built-ins under their names, with the YAML's keys over their defaults."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        given = data.get("rules")
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            return data
        merged: dict[str, Any] = {}
        for name, default in BUILTIN_RULES.items():
            override = given.get(name)
            override = {} if override is None else override
            if (
                not isinstance(override, Mapping)
                or override.get("type", default["type"]) != (default["type"])
            ):
                merged[name] = override  # another type: a rule of its own under this name
            else:
                merged[name] = {**default, **override}
        for name, spec in given.items():
            if name in BUILTIN_RULES:
                continue
            if isinstance(spec, Mapping) and "type" not in spec:
                raise ValueError(
                    f"rules.{name}: not a built-in rule, so it needs `type` (one of "
                    f"{', '.join(alert_rules.RULE_TYPES)}) and `metric`; built-in rules: "
                    f"{', '.join(BUILTIN_RULES)}"
                )
            merged[str(name)] = spec
        data["rules"] = merged
        return data

    @pydantic.model_validator(mode="after")
    def _destinations_exist(self) -> Self:
        reserved = [name for name in self.destinations if name in BUILTIN_DESTINATIONS]
        if reserved:
            raise ValueError(f"destinations: {', '.join(reserved)} is built in; pick another name")
        known = [*BUILTIN_DESTINATIONS, *self.destinations]
        wanted = [("default_destinations", self.default_destinations)] + [
            (f"rules.{name}.destinations", spec.destinations or [])
            for name, spec in self.rules.items()
        ]
        for where, names in wanted:
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ValueError(
                    f"{where}: unknown destination {', '.join(map(repr, unknown))}; "
                    f"known: {', '.join(known)}"
                )
        return self


# -- the engine -----------------------------------------------------------------------------------
@dataclass
class _Holding:
    """A condition rule's episode for one state key: its alert key and whether it fired."""

    alert_key: AlertKey
    fired: bool = False


class AlertEngine:
    """Evaluates the rules on the analysis thread; see the module docstring."""

    def __init__(
        self,
        config: AlertsConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        strict: bool = False,
    ) -> None:
        """``strict`` re-raises a rule's exception (tests); otherwise it is counted and logged."""
        config = config if config is not None else AlertsConfig()
        self.clock = clock
        self.strict = strict
        self.max_state_keys = config.max_state_keys
        self.rules: list[Rule[Any]] = []
        if config.enabled:
            for name, spec in config.rules.items():
                if spec.enabled:
                    destinations = (
                        spec.destinations
                        if spec.destinations is not None
                        else config.default_destinations
                    )
                    self.rules.append(alert_rules.RULE_TYPES[spec.type](name, spec, destinations))
        self._by_name = {rule.name: rule for rule in self.rules}
        self._metric_rules = [r for r in self.rules if type(r).wants is not Rule.wants]
        self._tick_rules = [r for r in self.rules if type(r).on_tick is not Rule.on_tick]
        self._event_rules = [r for r in self.rules if type(r).on_event is not Rule.on_event]
        used = {d for rule in self.rules for d in rule.destinations}
        self._senders = {
            name: WebhookSender(
                name,
                dest.url,
                format=dest.format,
                timeout=dest.timeout_seconds,
                headers=dest.headers,
                queue_size=dest.queue_size,
            )
            for name, dest in config.destinations.items()
            if name in used
        }
        self._match_cache: dict[str, tuple[Rule[Any], ...]] = {}
        self._state: dict[StateKey, Any] = {}
        self._ranks: dict[tuple[str, int], RankInfo] = {}
        self._ended: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._holding: dict[StateKey, _Holding] = {}
        self._last_fired: dict[AlertKey, float] = {}
        self._oneshot_until: dict[AlertKey, float] = {}
        self._fired: collections.deque[dict[str, Any]] = collections.deque()
        self._counts: dict[tuple[str, str], int] = {}
        self._suppressed: dict[str, int] = {}
        self._errors = {
            "state_refused": 0,
            "ranks_refused": 0,
            "fired_dropped": 0,
            "template_errors": 0,
            "rule_errors": 0,
        }
        self._last_prune = clock()
        self._last_error_log = -math.inf
        self._lock = threading.Lock()  # what other threads read: fired, counts, active

    @classmethod
    def from_config(
        cls, config: AlertsConfig, clock: Callable[[], float] = time.monotonic
    ) -> AlertEngine:
        return cls(config, clock=clock)

    # -- inputs ---------------------------------------------------------------------------------
    def observe(
        self, run: str, rank: int, step: int | None, t: float, metrics: Mapping[str, float]
    ) -> None:
        """Numeric samples of one record (rank -1: system samples)."""
        if not self._metric_rules or run in self._ended:
            return
        step = step if isinstance(step, int) and not isinstance(step, bool) else None
        t = float(t) if isinstance(t, int | float) and math.isfinite(t) else time.time()
        record_rules: dict[Rule[Any], None] = {}
        for name, raw in metrics.items():
            rules = self._rules_for(name)
            if not rules:
                continue
            try:
                value = float(raw)
            except (TypeError, ValueError):
                continue
            for rule in rules:
                try:
                    rule.on_sample(self, run, rank, step, t, name, value)
                except Exception as exc:
                    self._rule_error(rule, exc)
                if rule.record_level:
                    record_rules[rule] = None
        for rule in record_rules:
            try:
                rule.on_record(self, run, rank, step, t, metrics)
            except Exception as exc:
                self._rule_error(rule, exc)

    def observe_event(self, run: str, rank: int, kind: str, attrs: Mapping[str, Any]) -> None:
        """A non-numeric event: hello, record, bye, run_end, process_gone, probe_stats, ..."""
        attrs = attrs if isinstance(attrs, Mapping) else {}
        if kind == "record":
            if run not in self._ended:
                info = self._rank(run, rank)
                if info is not None:
                    info.last_record = self.clock()
            return
        if kind == "hello":
            self._ended.pop(run, None)
            info = self._rank(run, rank)
            if info is not None:
                pid = attrs.get("pid")
                info.pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
                info.said_bye, info.last_record = False, None  # a (re)started rank: a new clock
        elif kind == "bye":
            info = self._rank(run, rank)
            if info is not None:
                info.said_bye = True
        for rule in self._event_rules:
            try:
                rule.on_event(self, run, rank, kind, attrs)
            except Exception as exc:
                self._rule_error(rule, exc)
        if kind == "bye":
            self._forget(run, rank)
        elif kind == "run_end":
            self._forget(run, None)
            self._ended[run] = None
            while len(self._ended) > ENDED_RUNS_LIMIT:
                self._ended.popitem(last=False)

    def tick(self) -> None:
        """Time-based rules (stalled, run_died's grace) and housekeeping; about once a second."""
        now = self.clock()
        for rule in self._tick_rules:
            try:
                rule.on_tick(self, now)
            except Exception as exc:
                self._rule_error(rule, exc)
        if now - self._last_prune >= PRUNE_SECONDS:
            self._prune(now)

    # -- outputs --------------------------------------------------------------------------------
    def take_fired(self) -> list[dict[str, Any]]:
        """Alerts fired since the last call, oldest first."""
        with self._lock:
            fired = list(self._fired)
            self._fired.clear()
        return fired

    def active(self) -> list[dict[str, str]]:
        """(name, severity, run) of alerts whose condition holds or whose one-shot is recent."""
        now = self.clock()
        with self._lock:
            keys = {h.alert_key for h in self._holding.values()}
            keys.update(k for k, until in self._oneshot_until.items() if until > now)
        found = {(key[0], self._by_name[key[0]].severity, key[1]) for key in keys}
        return [
            {"name": name, "severity": severity, "run": run}
            for name, severity, run in sorted(found)
        ]

    def counts(self) -> dict[tuple[str, str], int]:
        """Alerts fired so far by (rule name, severity)."""
        with self._lock:
            return dict(self._counts)

    def suppressed(self) -> dict[str, int]:
        """Firings held back by a cooldown, by rule name."""
        with self._lock:
            return dict(self._suppressed)

    def stats(self) -> dict[str, Any]:
        """The engine's own health: state size, refusals, errors and each webhook's counters."""
        with self._lock:
            figures: dict[str, Any] = dict(self._errors)
            figures["suppressed"] = sum(self._suppressed.values())
        figures["state_keys"] = len(self._state)
        figures["webhooks"] = {name: sender.stats() for name, sender in self._senders.items()}
        return figures

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s in all for the webhooks to work off their queues."""
        deadline = time.monotonic() + max(0.0, timeout)
        done = True
        for sender in self._senders.values():
            done = sender.flush(max(0.0, deadline - time.monotonic())) and done
        return done

    def close(self, timeout: float = 5.0) -> bool:
        """Give the webhooks up to ``timeout`` s in all to deliver; True if all finished."""
        deadline = time.monotonic() + max(0.0, timeout)
        done = True
        for sender in self._senders.values():
            done = sender.close(max(0.0, deadline - time.monotonic())) and done
        return done

    # -- what rules call (alert_rules.Context) ---------------------------------------------------
    @property
    def ranks(self) -> Mapping[tuple[str, int], RankInfo]:
        return self._ranks

    def now(self) -> float:
        return self.clock()

    def state(
        self, rule: Rule[Any], run: str, rank: int, metric: str, factory: Callable[[], T]
    ) -> T | None:
        key = (rule.name, run, rank, metric)
        slot = self._state.get(key)
        if slot is None:
            if len(self._state) >= self.max_state_keys:
                self._errors["state_refused"] += 1
                return None
            slot = self._state[key] = factory()
        return slot

    def report(
        self,
        rule: Rule[Any],
        run: str,
        rank: int,
        metric: str,
        step: int | None,
        holding: bool,
        value: float | None = None,
        threshold: float | None = None,
        extra: Mapping[str, Any] | None = None,
        key: str | None = None,
    ) -> None:
        """Apply the cooldown and fire; condition rules fire once per episode of holding."""
        episode: _Holding | None = None
        if not rule.oneshot:
            state_key = (rule.name, run, rank, metric)
            if not holding:
                if state_key in self._holding:
                    with self._lock:
                        self._holding.pop(state_key, None)
                return
            episode = self._holding.get(state_key)
            if episode is not None and episode.fired:
                return
        elif not holding:
            return
        rising = episode is None
        alert_key = (
            rule.name,
            run,
            rank,
            key if key is not None else self._key_metric(rule, metric),
        )
        if episode is None and not rule.oneshot:
            if len(self._holding) >= self.max_state_keys:
                self._errors["state_refused"] += 1
                return
            episode = _Holding(alert_key)
            with self._lock:
                self._holding[(rule.name, run, rank, metric)] = episode
        now = self.clock()
        last = self._last_fired.get(alert_key)
        if last is not None and now - last < rule.cooldown:
            if rising:
                with self._lock:
                    self._suppressed[rule.name] = self._suppressed.get(rule.name, 0) + 1
            return
        if last is None and len(self._last_fired) >= self.max_state_keys:
            self._prune(now)
            if len(self._last_fired) >= self.max_state_keys:
                self._errors["state_refused"] += 1
                return
        self._last_fired[alert_key] = now
        if episode is not None:
            episode.fired = True
        else:
            with self._lock:
                self._oneshot_until[alert_key] = now + rule.cooldown
        self._fire(rule, run, rank, metric, step, value, threshold, extra or {})

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _key_metric(rule: Rule[Any], metric: str) -> str:
        return metric if rule.keyed_by_metric else ""

    def _fire(
        self,
        rule: Rule[Any],
        run: str,
        rank: int,
        metric: str,
        step: int | None,
        value: float | None,
        threshold: float | None,
        extra: Mapping[str, Any],
    ) -> None:
        fields = {
            "name": rule.name,
            "metric": metric,
            "value": math.nan if value is None else value,
            "threshold": math.nan if threshold is None else threshold,
            "step": step,
            "run": run,
            "rank": rank,
            "severity": rule.severity,
            **extra,
        }
        try:
            message = rule.template.format_map(fields)
        except Exception:  # checked at config time; a value of an unexpected type got through
            self._errors["template_errors"] += 1
            message = f"{rule.name}: {metric}={value} (run {run}, rank {rank}, step {step})"
        alert: dict[str, Any] = {
            "kind": "alert",
            "name": rule.name,
            "severity": rule.severity,
            "message": message,
            "run": run,
            "rank": rank,
            "step": step,
            "attrs": {"metric": metric, "value": value, "threshold": threshold, **extra},
            "destinations": list(rule.destinations),
        }
        with self._lock:
            if len(self._fired) >= MAX_FIRED:
                self._fired.popleft()
                self._errors["fired_dropped"] += 1
            self._fired.append(alert)
            count_key = (rule.name, rule.severity)
            self._counts[count_key] = self._counts.get(count_key, 0) + 1
        for destination in rule.destinations:
            if destination == "log":
                logger.log(
                    LOG_LEVELS[rule.severity],
                    "outrider alert %s [%s]: %s",
                    rule.name,
                    rule.severity,
                    message,
                )
            else:
                sender = self._senders.get(destination)
                if sender is not None:
                    sender.submit(alert)

    def _rules_for(self, name: str) -> tuple[Rule[Any], ...]:
        rules = self._match_cache.get(name)
        if rules is None:
            rules = tuple(rule for rule in self._metric_rules if rule.wants(name))
            if len(self._match_cache) < MATCH_CACHE_LIMIT:
                self._match_cache[name] = rules
        return rules

    def _rank(self, run: str, rank: int) -> RankInfo | None:
        if rank < 0:
            return None
        info = self._ranks.get((run, rank))
        if info is None:
            if len(self._ranks) >= self.max_state_keys:
                self._errors["ranks_refused"] += 1
                return None
            info = self._ranks[(run, rank)] = RankInfo()
        return info

    def _forget(self, run: str, rank: int | None) -> None:
        """Drop a run's (or one rank's) state: it said bye or ended."""

        def gone(key: tuple[str, str, int, str]) -> bool:
            return key[1] == run and (rank is None or key[2] == rank)

        for key in [k for k in self._state if gone(k)]:
            del self._state[key]
        with self._lock:
            for key in [k for k in self._holding if gone(k)]:
                del self._holding[key]
        if rank is None:
            for rank_key in [k for k in self._ranks if k[0] == run]:
                del self._ranks[rank_key]
        for rule in self.rules:
            rule.forget(run, rank)

    def _prune(self, now: float) -> None:
        """Forget cooldowns and one-shot activity that have run out."""
        self._last_prune = now
        for key, last in list(self._last_fired.items()):
            rule = self._by_name.get(key[0])
            if rule is None or now - last >= rule.cooldown:
                del self._last_fired[key]
        with self._lock:
            for key in [k for k, until in self._oneshot_until.items() if until <= now]:
                del self._oneshot_until[key]

    def _rule_error(self, rule: Rule[Any], exc: Exception) -> None:
        self._errors["rule_errors"] += 1
        if self.strict:
            raise exc
        now = self.clock()
        if now - self._last_error_log >= PRUNE_SECONDS:
            self._last_error_log = now
            logger.warning(
                "outrider alerts: rule %r failed: %r (%d rule errors so far)",
                rule.name,
                exc,
                self._errors["rule_errors"],
            )


__all__ = [
    "BUILTIN_DESTINATIONS",
    "BUILTIN_RULES",
    "DEFAULT_ALERTS_YAML",
    "AlertEngine",
    "AlertsConfig",
    "Severity",
    "WebhookDestination",
]
