"""The alert engine: rules over a run's metrics and events, with cooldowns and destinations.

The agent's analysis thread feeds it samples (``observe``), non-numeric events
(``observe_event``) and a tick about once a second (``tick``); it takes back the
alerts fired since the last call (``take_fired``). Everything is evaluated on
that one thread, so a rule never delays the training job or the run store; the
only threads here are the webhook senders (``agent/alerts/webhooks.py``).

Rule kinds live in ``agent/alerts/rules/``, the ``alerts:`` config section and
the built-in rules in ``agent/alerts/config.py`` (read from
``agent/alerts/defaults.yaml``). This module is the engine's bookkeeping:
per-key state under a hard cap, cooldowns, which alerts are active, and
delivery to ``log`` and webhooks. ``store`` and ``sinks`` are names the
integrator acts on.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from agent.alerts.config import BUILTIN_RULES, DEFAULT_ALERTS_YAML, AlertsConfig
from agent.alerts.rules import RECORD, RULE_TYPES, RankInfo, Rule
from agent.alerts.rules.base import drop_run, integer
from agent.alerts.webhooks import WebhookSender
from probe import protocol
from sinks import schema
from sinks.ratelimit import RateLimitedLog

logger = logging.getLogger("outrider.alerts")

MAX_FIRED = 10_000  # alerts waiting for take_fired; the oldest are dropped (counted) past it
MATCH_CACHE_LIMIT = 20_000  # metric names whose matching rules are remembered
ENDED_RUNS_LIMIT = 1_000
PRUNE_SECONDS = 60.0
RULE_ERROR_LOG_SECONDS = 60.0  # a failing rule is logged at most this often
LOG_LEVELS = {
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}

T = TypeVar("T")
StateKey = tuple[str, str, int, str]  # rule, run, rank, metric
AlertKey = tuple[str, str, int, str]  # rule, run, rank, metric for pattern rules ("" otherwise)


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
                    self.rules.append(RULE_TYPES[spec.type](name, spec, destinations))
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
        self._complaints = RateLimitedLog(RULE_ERROR_LOG_SECONDS, clock, logger)
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
        if run in self._ended:
            return
        step = integer(step)
        if step is not None and rank >= 0:
            info = self._rank(run, rank)
            if info is not None:
                if info.first_step is None:
                    info.first_step = step
                info.last_step = step
        if not self._metric_rules:
            return
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
        if kind == RECORD:
            if run not in self._ended:
                info = self._rank(run, rank)
                if info is not None:
                    info.last_record = self.clock()
            return
        if kind == protocol.HELLO:
            self._ended.pop(run, None)
            info = self._rank(run, rank)
            if info is not None:
                info.pid = integer(attrs.get("pid"))
                info.said_bye, info.last_record = False, None  # a (re)started rank: a new clock
                info.first_step = info.last_step = None
        elif kind == protocol.BYE:
            info = self._rank(run, rank)
            if info is not None:
                info.said_bye = True
        for rule in self._event_rules:
            try:
                rule.on_event(self, run, rank, kind, attrs)
            except Exception as exc:
                self._rule_error(rule, exc)
        if kind == protocol.BYE:
            self._forget(run, rank)
        elif kind == protocol.RUN_END:
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

    # -- what rules call (rules.Context) ---------------------------------------------------
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
            "kind": schema.ALERT,
            "name": rule.name,
            "severity": rule.severity,
            "message": message,
            "advice": rule.advice,
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
                    "outrider alert %s [%s]: %s -- what to do: %s",
                    rule.name,
                    rule.severity,
                    message,
                    rule.advice,
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
            drop_run(self._ranks, run, None)
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
        self._complaints.warning(
            f"rule:{rule.name}",
            "outrider alerts: rule %r failed: %r (%d rule errors so far)",
            rule.name,
            exc,
            self._errors["rule_errors"],
        )


# The `alerts:` section and its built-in defaults (agent/alerts/config.py) come with the engine.
__all__ = [
    "BUILTIN_RULES",
    "DEFAULT_ALERTS_YAML",
    "AlertEngine",
    "AlertsConfig",
]
