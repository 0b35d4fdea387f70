"""Alert rule kinds: what the YAML may say about each, and the state machine that runs it.

A kind is a pydantic ``*Spec`` (one entry of ``alerts.rules`` in the agent's
YAML, checked when the config is loaded, message template included) and a
``Rule`` the engine runs. Rules keep their per-(run, rank, metric) state in
slots the engine hands out (``Context.state``), so the engine can cap it and
forget a run when it ends; whether a condition holds, cooldowns and delivery
are the engine's business too (``Context.report``).

Data-driven durations and rates (``for_seconds``, per-second rates, memory
growth) use the samples' own times ``t``; stall and grace times use the
engine's injected clock.
"""

from __future__ import annotations

import collections
import fnmatch
import math
import re
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Literal, Protocol, Self, TypeVar

import pydantic

Severity = Literal["info", "warning", "error", "critical"]
SEVERITIES: tuple[Severity, ...] = ("info", "warning", "error", "critical")
TABLE_LIMIT = 10_000  # entries in a rule's own side tables (power limits, pending deaths)
NAN = float("nan")

#: fields every message template may use, with the values a template is test-rendered with
COMMON_FIELDS: Mapping[str, object] = {
    "name": "rule",
    "metric": "loss",
    "value": 1.0,
    "threshold": 1.0,
    "step": 0,
    "run": "run",
    "rank": 0,
    "severity": "warning",
}

T = TypeVar("T")


# -- templates and metric patterns --------------------------------------------------------------
def check_template(template: str, fields: Mapping[str, object]) -> None:
    """Raise ValueError unless ``template`` renders with ``fields`` (and with step None)."""
    known = ", ".join("{" + name + "}" for name in sorted(fields))
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"message template {template!r}: {exc}") from None
    for _, name, _, _ in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit():
            raise ValueError(
                f"message template {template!r}: positional field {{{name}}}; use names: {known}"
            )
        if "." in name or "[" in name:
            raise ValueError(
                f"message template {template!r}: {{{name}}}: attribute and index lookups are "
                f"not allowed; fields: {known}"
            )
        if name not in fields:
            raise ValueError(f"message template {template!r}: unknown field {{{name}}}; {known}")
    for step in (0, None):
        try:
            template.format_map({**fields, "step": step})
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            hint = " (step is None for records without a step: format it as {step})"
            raise ValueError(
                f"message template {template!r} does not render: {exc}"
                + (hint if step is None else "")
            ) from None


def is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in "*?[")


class MetricPattern:
    """Exact metric names and fnmatch globs (case-sensitive; ``*`` also matches ``/``)."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self.exact = frozenset(p for p in patterns if not is_glob(p))
        globs = [p for p in patterns if is_glob(p)]
        self.is_glob = bool(globs)
        self._regex = (
            re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs)) if globs else None
        )

    def __call__(self, name: str) -> bool:
        return name in self.exact or (
            self._regex is not None and self._regex.match(name) is not None
        )


def _names(metric: str | list[str]) -> list[str]:
    return [metric] if isinstance(metric, str) else list(metric)


def _finite(value: float) -> bool:
    return math.isfinite(value)


def least_squares_slope(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """Slope of the least-squares line through the points; None for fewer than two x values."""
    n = len(xs)
    if n < 2:
        return None
    mean_x = sum(xs) / n
    mean_y = sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx <= 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx


# -- specs: the YAML ------------------------------------------------------------------------------
class RuleSpec(pydantic.BaseModel):
    """Fields every rule has."""

    model_config = pydantic.ConfigDict(extra="forbid")

    type: str
    severity: Severity = "warning"
    cooldown: float = pydantic.Field(default=300.0, ge=0)
    message: str | None = None
    destinations: list[str] | None = None
    enabled: bool = True

    default_message: ClassVar[str] = "{name}: {metric}={value} (run {run}, rank {rank})"
    extra_fields: ClassVar[Mapping[str, object]] = {}

    @property
    def template(self) -> str:
        return self.message if self.message is not None else self.default_message

    @pydantic.model_validator(mode="after")
    def _renders(self) -> Self:
        check_template(self.template, {**COMMON_FIELDS, **self.extra_fields})
        return self


class MetricRuleSpec(RuleSpec):
    """A rule fed by numeric samples: ``metric`` is a name, a glob, or a list of them."""

    metric: str | list[str]

    @pydantic.field_validator("metric")
    @classmethod
    def _metric_names(cls, value: str | list[str]) -> str | list[str]:
        names = _names(value)
        if not names or any(not name.strip() for name in names):
            raise ValueError("metric needs at least one non-empty name or glob")
        return value


def _exact(value: str | None) -> str | None:
    if value is not None and (not value.strip() or is_glob(value)):
        raise ValueError(f"{value!r}: need one exact metric name here, not a glob")
    return value


class ThresholdSpec(MetricRuleSpec):
    type: Literal["threshold"]
    above: float | None = None
    below: float | None = None
    for_steps: int = pydantic.Field(default=1, ge=1)
    for_seconds: float = pydantic.Field(default=0.0, ge=0)
    limit_metric: str | None = None
    limit_fraction: float | None = pydantic.Field(default=None, gt=0)

    default_message: ClassVar[str] = (
        "{name}: {metric}={value:.4g} is {direction} {threshold:.4g} "
        "(run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {"direction": "above", "limit": 1.0}

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.above is None and self.below is None and self.limit_fraction is None:
            raise ValueError("a threshold rule needs `above`, `below` or `limit_fraction`")
        if (self.limit_metric is None) != (self.limit_fraction is None):
            raise ValueError("`limit_metric` and `limit_fraction` go together")
        if self.limit_metric is not None and (
            "/" in self.limit_metric or is_glob(self.limit_metric)
        ):
            raise ValueError(
                "`limit_metric` is the last part of a sibling name, e.g. power_limit_watts"
            )
        return self


class RateSpec(MetricRuleSpec):
    type: Literal["rate"]
    per: Literal["second", "step"] = "second"
    above: float | None = None
    below: float | None = None

    default_message: ClassVar[str] = (
        "{name}: {metric} changed by {rate:.4g} per {per} (limit {threshold:.4g}), now "
        "{value:.4g} (run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {"rate": 1.0, "previous": 1.0, "per": "second"}

    @pydantic.model_validator(mode="after")
    def _bounds(self) -> Self:
        if self.above is None and self.below is None:
            raise ValueError("a rate rule needs `above` or `below` (change per second or step)")
        return self


class ZScoreSpec(MetricRuleSpec):
    type: Literal["zscore"]
    z: float = pydantic.Field(default=4.0, gt=0)
    alpha: float = pydantic.Field(default=0.02, gt=0, lt=1)
    warmup: int = pydantic.Field(default=50, ge=2)
    log: bool = False
    direction: Literal["up", "down", "both"] = "up"
    min_std: float = pydantic.Field(default=0.0, ge=0)
    above: float | None = None

    default_message: ClassVar[str] = (
        "{name}: {metric}={value:.4g} is {zscore:.1f} standard deviations from its moving "
        "mean {mean:.4g} (run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {"zscore": 1.0, "mean": 1.0, "std": 1.0}


class NonfiniteSpec(MetricRuleSpec):
    type: Literal["nonfinite"]
    flags: list[str] = pydantic.Field(default_factory=list)

    default_message: ClassVar[str] = (
        "{name}: {metric}={value} (run {run}, rank {rank}, step {step})"
    )


class PlateauSpec(MetricRuleSpec):
    type: Literal["plateau"]
    metric: str
    fallback_metric: str | None = None
    mode: Literal["min", "max"] = "min"
    patience: int = pydantic.Field(default=10, ge=0)
    threshold: float = pydantic.Field(default=1e-4, ge=0)
    threshold_mode: Literal["rel", "abs"] = "rel"
    cooldown_evaluations: int = pydantic.Field(default=0, ge=0)
    window: int = pydantic.Field(default=1, ge=1)
    fallback_window: int = pydantic.Field(default=100, ge=1)

    default_message: ClassVar[str] = (
        "{name}: {metric} has not improved on {best:.4g} for {bad_evaluations} evaluations "
        "(run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "best": 1.0,
        "bad_evaluations": 1,
        "patience": 1,
        "evaluations": 1,
    }

    @pydantic.field_validator("metric", "fallback_metric")
    @classmethod
    def _exact_names(cls, value: str | None) -> str | None:
        return _exact(value)


class OverfittingSpec(MetricRuleSpec):
    type: Literal["overfitting"]
    metric: str
    train_metric: str = "loss"
    evaluations: int = pydantic.Field(default=5, ge=3)
    min_rise: float = pydantic.Field(default=0.01, ge=0)

    default_message: ClassVar[str] = (
        "{name}: {metric} rose {rise:.1%} over the last {evaluations} evaluations while "
        "{train_metric} fell (run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "rise": 0.1,
        "val_slope": 1.0,
        "train_slope": -1.0,
        "train_metric": "loss",
        "evaluations": 5,
    }

    @pydantic.field_validator("metric", "train_metric")
    @classmethod
    def _exact_names(cls, value: str) -> str:
        _exact(value)
        return value


class CollapseSpec(MetricRuleSpec):
    type: Literal["collapse"]
    effective_rank_below: float | None = 2.0
    collapse_ratio_below: float | None = 0.1
    for_steps: int = pydantic.Field(default=1, ge=1)

    default_message: ClassVar[str] = (
        "{name}: {metric}={value:.3g} is below {threshold:.3g} "
        "(run {run}, rank {rank}, step {step})"
    )


class TrendSpec(MetricRuleSpec):
    type: Literal["trend"]
    slope_above: float = pydantic.Field(default=0.0, ge=0)
    min_growth_fraction: float = pydantic.Field(default=0.05, ge=0)
    window_seconds: float = pydantic.Field(default=900.0, gt=0)
    warmup_seconds: float = pydantic.Field(default=300.0, ge=0)
    buckets: int = pydantic.Field(default=60, ge=4, le=1000)

    default_message: ClassVar[str] = (
        "{name}: {metric} grew {growth:.1%} ({slope:.4g} per second) over the last "
        "{window_seconds:.0f} s, now {value:.4g} (run {run}, rank {rank})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "slope": 1.0,
        "growth": 0.1,
        "window_seconds": 1.0,
        "start": 1.0,
    }


class InputBoundSpec(MetricRuleSpec):
    type: Literal["input_bound"]
    metric: str
    step_time_metric: str = "step_time_seconds"
    util_metric: str = "system/gpu*/util_percent"
    util_below: float = 50.0
    wait_fraction_above: float = pydantic.Field(default=0.3, ge=0, le=1)
    smoothing: float = pydantic.Field(default=0.1, gt=0, le=1)
    for_seconds: float = pydantic.Field(default=120.0, ge=0)

    default_message: ClassVar[str] = (
        "{name}: rank {worst_rank} waits for data {wait_fraction:.0%} of each step while "
        "GPU utilisation is at most {util:.0f}% (run {run})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "wait_fraction": 0.5,
        "util": 10.0,
        "worst_rank": 0,
    }

    @pydantic.field_validator("metric", "step_time_metric")
    @classmethod
    def _exact_names(cls, value: str) -> str:
        _exact(value)
        return value


class StalledSpec(RuleSpec):
    type: Literal["stalled"]
    after_seconds: float = pydantic.Field(default=300.0, gt=0)

    default_message: ClassVar[str] = (
        "{name}: no record from run {run} rank {rank} for {value:.0f} s"
    )


class RunDiedSpec(RuleSpec):
    type: Literal["run_died"]
    grace_seconds: float = pydantic.Field(default=5.0, ge=0)

    default_message: ClassVar[str] = (
        "{name}: run {run} rank {rank} ended without a bye ({reason}, exit status "
        "{exit_status}, pid {pid})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "reason": "process_gone",
        "exit_status": None,
        "pid": None,
    }


class ProbeDropsSpec(RuleSpec):
    type: Literal["probe_drops"]

    default_message: ClassVar[str] = (
        "{name}: the probe of run {run} rank {rank} dropped records: {reasons}"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "reasons": "queue_full +1",
        "increase": {},
        "total": {},
    }


class EventSpec(RuleSpec):
    type: Literal["event"]
    event: str
    key_attr: str | None = None

    default_message: ClassVar[str] = "{name}: {detail} (run {run})"
    extra_fields: ClassVar[Mapping[str, object]] = {
        "event": "sink_failed",
        "source": "wandb",
        "detail": "detail",
    }


AnySpec = (
    ThresholdSpec
    | RateSpec
    | ZScoreSpec
    | NonfiniteSpec
    | PlateauSpec
    | OverfittingSpec
    | CollapseSpec
    | TrendSpec
    | InputBoundSpec
    | StalledSpec
    | RunDiedSpec
    | ProbeDropsSpec
    | EventSpec
)


# -- what a rule may ask of the engine -------------------------------------------------------------
@dataclass
class RankInfo:
    """What the engine knows of one trainer rank (from hello / record / bye events)."""

    pid: int | None = None
    last_record: float | None = None
    said_bye: bool = False


class Context(Protocol):
    """The engine, as rules see it."""

    @property
    def ranks(self) -> Mapping[tuple[str, int], RankInfo]: ...

    def now(self) -> float: ...

    def state(
        self, rule: Rule[Any], run: str, rank: int, metric: str, factory: Callable[[], T]
    ) -> T | None:
        """The rule's slot for (run, rank, metric); None when the engine's cap refuses a new one."""
        ...

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
        """Whether the rule's condition holds now; the engine applies cooldowns and fires."""
        ...


S = TypeVar("S", bound=RuleSpec)


class Rule(Generic[S]):
    """One configured rule. ``oneshot`` rules fire on events; the others on conditions."""

    oneshot: ClassVar[bool] = True
    record_level: ClassVar[bool] = False  # on_record gets the whole sample mapping

    def __init__(self, name: str, spec: S, destinations: Sequence[str]) -> None:
        self.name = name
        self.spec = spec
        self.severity: Severity = spec.severity
        self.cooldown = spec.cooldown
        self.template = spec.template
        self.destinations = tuple(destinations)
        self.keyed_by_metric = False

    def wants(self, metric: str) -> bool:
        return False

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        return None

    def on_record(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metrics: Mapping[str, Any],
    ) -> None:
        return None

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        return None

    def on_tick(self, ctx: Context, now: float) -> None:
        return None

    def forget(self, run: str, rank: int | None) -> None:
        """Drop side tables for a run (rank None) or one rank that said bye."""
        return None


class _MetricRule(Rule[S]):
    def __init__(self, name: str, spec: S, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        if not isinstance(spec, MetricRuleSpec):
            raise TypeError(f"rule {name!r}: {type(spec).__name__} has no metric")
        self.match = MetricPattern(_names(spec.metric))
        self.keyed_by_metric = self.match.is_glob

    def wants(self, metric: str) -> bool:
        return self.match(metric)


@dataclass
class _Sustain:
    """How long a condition has held: a span of steps (samples without steps) and of time."""

    count: int = 0
    since_step: int | None = None
    since_t: float = 0.0

    def update(self, holding: bool, step: int | None, t: float, steps: int, seconds: float) -> bool:
        if not holding:
            self.count = 0
            return False
        if self.count == 0:
            self.since_step, self.since_t = step, t
        self.count += 1
        if step is not None and self.since_step is not None:
            span = step - self.since_step + 1
        else:
            span = self.count
        return span >= steps and t - self.since_t >= seconds


def _parent(name: str) -> str:
    return name.rpartition("/")[0]


# -- metric rules ---------------------------------------------------------------------------------
class ThresholdRule(_MetricRule[ThresholdSpec]):
    """Above/below a bound (or a fraction of a sibling limit), sustained for steps/seconds."""

    oneshot = False

    def __init__(self, name: str, spec: ThresholdSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self.limit_match: MetricPattern | None = None
        if spec.limit_metric is not None:
            siblings = [
                f"{_parent(p)}/{spec.limit_metric}".lstrip("/") for p in _names(spec.metric)
            ]
            self.limit_match = MetricPattern(siblings)
        self._limits: dict[tuple[str, int, str], float] = {}

    def wants(self, metric: str) -> bool:
        return self.match(metric) or (self.limit_match is not None and self.limit_match(metric))

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        spec = self.spec
        if self.limit_match is not None and self.limit_match(metric) and not self.match(metric):
            key = (run, rank, _parent(metric))
            if (
                _finite(value)
                and value > 0
                and (key in self._limits or len(self._limits) < TABLE_LIMIT)
            ):
                self._limits[key] = value
            return
        sustain = ctx.state(self, run, rank, metric, _Sustain)
        if sustain is None:
            return
        limit = self._limits.get((run, rank, _parent(metric))) if self.limit_match else None
        direction, bound = "above", NAN
        if limit is not None and spec.limit_fraction is not None:
            bound = limit * spec.limit_fraction
            crossed = value > bound
        elif spec.above is not None and value > spec.above:
            bound, crossed = spec.above, True
        elif spec.below is not None and value < spec.below:
            direction, bound, crossed = "below", spec.below, True
        else:
            crossed = False
        holding = sustain.update(crossed, step, t, spec.for_steps, spec.for_seconds)
        extra = {"direction": direction, "limit": limit if limit is not None else NAN}
        ctx.report(self, run, rank, metric, step, holding, value, bound, extra)

    def forget(self, run: str, rank: int | None) -> None:
        for key in [k for k in self._limits if k[0] == run and (rank is None or k[1] == rank)]:
            del self._limits[key]


@dataclass
class _Previous:
    t: float | None = None
    step: int | None = None
    value: float = 0.0


class RateRule(_MetricRule[RateSpec]):
    """Change between consecutive samples, per second (sample times) or per step."""

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        if not _finite(value):
            return
        previous = ctx.state(self, run, rank, metric, _Previous)
        if previous is None:
            return
        spec = self.spec
        if previous.t is not None:
            if spec.per == "second":
                span: float | None = t - previous.t
            else:
                span = (
                    step - previous.step if step is not None and previous.step is not None else None
                )
            if span is not None and span > 0:
                rate = (value - previous.value) / span
                bound = NAN
                if spec.above is not None and rate > spec.above:
                    bound = spec.above
                elif spec.below is not None and rate < spec.below:
                    bound = spec.below
                if not math.isnan(bound):
                    extra = {"rate": rate, "previous": previous.value, "per": spec.per}
                    ctx.report(self, run, rank, metric, step, True, value, bound, extra)
        previous.t, previous.step, previous.value = t, step, value


@dataclass
class _Ema:
    count: int = 0
    mean: float = 0.0
    var: float = 0.0


class ZScoreRule(_MetricRule[ZScoreSpec]):
    """Distance from an exponential moving mean, in moving standard deviations.

    Until ``1/alpha`` samples the weights are ``1/n`` (a plain running mean and
    variance), so the estimate is unbiased from the start. A sample beyond the
    threshold enters the averages clipped to ``mean +- z*std``: one spike barely
    moves the baseline, while a lasting level shift is still learned.
    """

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        spec = self.spec
        ema = ctx.state(self, run, rank, metric, _Ema)
        if ema is None:
            return
        fired = False
        if spec.above is not None and _finite(value) and value > spec.above:
            extra = {"zscore": NAN, "mean": self._mean(ema), "std": math.sqrt(ema.var)}
            ctx.report(self, run, rank, metric, step, True, value, spec.above, extra)
            fired = True
        if not _finite(value) or (spec.log and value <= 0):
            return
        x = math.log(value) if spec.log else value
        if ema.count >= spec.warmup:
            std = max(math.sqrt(ema.var), spec.min_std)
            deviation = x - ema.mean
            if std > 0:
                z = deviation / std
            else:
                z = 0.0 if deviation == 0 else math.copysign(math.inf, deviation)
            out = (
                z > spec.z
                if spec.direction == "up"
                else z < -spec.z
                if spec.direction == "down"
                else abs(z) > spec.z
            )
            if out:
                if not fired:
                    extra = {"zscore": z, "mean": self._mean(ema), "std": std}
                    ctx.report(self, run, rank, metric, step, True, value, spec.z, extra)
                x = ema.mean + math.copysign(spec.z * std, deviation)
        ema.count += 1
        alpha = max(spec.alpha, 1.0 / ema.count)
        deviation = x - ema.mean
        increment = alpha * deviation
        ema.mean += increment
        ema.var = (1 - alpha) * (ema.var + deviation * increment)

    def _mean(self, ema: _Ema) -> float:
        if ema.count == 0:
            return NAN
        return math.exp(ema.mean) if self.spec.log else ema.mean


class NonfiniteRule(_MetricRule[NonfiniteSpec]):
    """A NaN/inf value of ``metric``, or a positive value of a ``flags`` metric."""

    oneshot = False

    def __init__(self, name: str, spec: NonfiniteSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self.flags = MetricPattern(spec.flags)
        self.match = MetricPattern([*_names(spec.metric), *spec.flags])
        self.keyed_by_metric = self.match.is_glob

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        holding = not value <= 0 if self.flags(metric) else not _finite(value)
        ctx.report(self, run, rank, metric, step, holding, value)


@dataclass
class _PlateauState:
    source: str = ""
    best: float = math.inf
    bad: int = 0
    cooldown: int = 0
    evaluations: int = 0
    total: float = 0.0
    count: int = 0

    def restart(self, source: str, best: float) -> None:
        self.source, self.best, self.bad, self.cooldown = source, best, 0, 0
        self.evaluations, self.total, self.count = 0, 0.0, 0


class PlateauRule(Rule[PlateauSpec]):
    """torch.optim.lr_scheduler.ReduceLROnPlateau's bookkeeping; fires where it would cut the LR.

    Each evaluation is the mean of ``window`` samples (``fallback_window`` for the
    fallback metric, which is used only while the run has not logged ``metric``).
    """

    def __init__(self, name: str, spec: PlateauSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self._primary_runs: collections.OrderedDict[str, None] = collections.OrderedDict()

    def wants(self, metric: str) -> bool:
        return metric == self.spec.metric or metric == self.spec.fallback_metric

    def _better(self, current: float, best: float) -> bool:
        spec = self.spec
        if spec.mode == "min":
            if spec.threshold_mode == "rel":
                return current < best * (1.0 - spec.threshold)
            return current < best - spec.threshold
        if spec.threshold_mode == "rel":
            return current > best * (1.0 + spec.threshold)
        return current > best + spec.threshold

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        if not _finite(value):
            return
        spec = self.spec
        primary = metric == spec.metric
        if primary:
            self._primary_runs[run] = None
            self._primary_runs.move_to_end(run)
            while len(self._primary_runs) > TABLE_LIMIT:
                self._primary_runs.popitem(last=False)
        elif run in self._primary_runs:
            return
        state = ctx.state(self, run, rank, "", _PlateauState)
        if state is None:
            return
        if state.source != metric:  # a fresh start: train and val losses are not comparable
            state.restart(metric, math.inf if spec.mode == "min" else -math.inf)
        state.total += value
        state.count += 1
        if state.count < (spec.window if primary else spec.fallback_window):
            return
        current = state.total / state.count
        state.total, state.count = 0.0, 0
        state.evaluations += 1
        if self._better(current, state.best):
            state.best, state.bad = current, 0
        else:
            state.bad += 1
        if state.cooldown > 0:
            state.cooldown -= 1
            state.bad = 0
        if state.bad > spec.patience:
            extra = {
                "best": state.best,
                "bad_evaluations": state.bad,
                "patience": spec.patience,
                "evaluations": state.evaluations,
            }
            state.cooldown, state.bad = spec.cooldown_evaluations, 0
            ctx.report(self, run, rank, metric, step, True, current, state.best, extra)

    def forget(self, run: str, rank: int | None) -> None:
        if rank is None:
            self._primary_runs.pop(run, None)


@dataclass
class _OverfitState:
    train_total: float = 0.0
    train_count: int = 0
    last_train: float | None = None
    evaluations: int = 0
    points: collections.deque[tuple[float, float, float]] = field(default_factory=collections.deque)


class OverfittingRule(Rule[OverfittingSpec]):
    """Least-squares trends of the last val values and of the mean train loss between them."""

    oneshot = False

    def wants(self, metric: str) -> bool:
        return metric == self.spec.metric or metric == self.spec.train_metric

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        if not _finite(value):
            return
        spec = self.spec
        state = ctx.state(self, run, rank, "", _OverfitState)
        if state is None:
            return
        if metric == spec.train_metric and metric != spec.metric:
            state.train_total += value
            state.train_count += 1
            return
        if state.train_count:
            state.last_train = state.train_total / state.train_count
            state.train_total, state.train_count = 0.0, 0
        if state.last_train is None:
            return
        state.evaluations += 1
        x = float(step) if step is not None else float(state.evaluations)
        if state.points and x <= state.points[-1][0]:
            state.points.clear()  # steps went back: a restart, a new curve
        state.points.append((x, value, state.last_train))
        while len(state.points) > spec.evaluations:
            state.points.popleft()
        if len(state.points) < spec.evaluations:
            return
        xs = [p[0] for p in state.points]
        val_slope = least_squares_slope(xs, [p[1] for p in state.points])
        train_slope = least_squares_slope(xs, [p[2] for p in state.points])
        if val_slope is None or train_slope is None:
            return
        mean_val = sum(p[1] for p in state.points) / len(state.points)
        rise = val_slope * (xs[-1] - xs[0]) / abs(mean_val) if mean_val else math.inf * val_slope
        holding = val_slope > 0 and rise >= spec.min_rise and train_slope < 0
        extra = {
            "rise": rise,
            "val_slope": val_slope,
            "train_slope": train_slope,
            "train_metric": spec.train_metric,
            "evaluations": spec.evaluations,
        }
        ctx.report(self, run, rank, metric, step, holding, value, spec.min_rise, extra)


class CollapseRule(_MetricRule[CollapseSpec]):
    """``*/effective_rank`` or ``*/collapse_ratio`` of a feature stream below its floor."""

    oneshot = False

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        spec = self.spec
        leaf = metric.rpartition("/")[2]
        floor = (
            spec.effective_rank_below
            if leaf == "effective_rank"
            else spec.collapse_ratio_below
            if leaf == "collapse_ratio"
            else None
        )
        if floor is None:
            return
        sustain = ctx.state(self, run, rank, metric, _Sustain)
        if sustain is None:
            return
        holding = sustain.update(value < floor, step, t, spec.for_steps, 0.0)
        ctx.report(self, run, rank, metric, step, holding, value, floor)


@dataclass
class _TrendState:
    first_t: float | None = None
    bucket_start: float | None = None
    sum_t: float = 0.0
    sum_v: float = 0.0
    count: int = 0
    points: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)


class TrendRule(_MetricRule[TrendSpec]):
    """Sustained growth: least-squares slopes over a window of bucketed sample means.

    Samples are averaged into ``buckets`` buckets per ``window_seconds`` (memory
    stays bounded whatever the sample rate). The condition holds when the slope
    over the whole window and over each of its halves exceeds ``slope_above``
    and the fitted growth over the window is at least ``min_growth_fraction`` of
    the fitted starting value: a one-off jump (a cache filling) rises in one
    half only and does not count.
    """

    oneshot = False

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        if not _finite(value):
            return
        spec = self.spec
        state = ctx.state(self, run, rank, metric, _TrendState)
        if state is None:
            return
        if state.first_t is None:
            state.first_t = t
        elapsed = t - state.first_t  # relative times keep the least-squares sums well conditioned
        if elapsed < spec.warmup_seconds:
            return
        width = spec.window_seconds / spec.buckets
        if state.bucket_start is None:
            state.bucket_start = elapsed
        elif elapsed - state.bucket_start >= width and state.count:
            state.points.append((state.sum_t / state.count, state.sum_v / state.count))
            state.bucket_start, state.sum_t, state.sum_v, state.count = elapsed, 0.0, 0.0, 0
            while state.points and state.points[0][0] < elapsed - spec.window_seconds:
                state.points.popleft()
            self._evaluate(ctx, run, rank, step, metric, value, state)
        state.sum_t += elapsed
        state.sum_v += value
        state.count += 1

    def _evaluate(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        metric: str,
        value: float,
        state: _TrendState,
    ) -> None:
        spec = self.spec
        points = list(state.points)
        if len(points) < 4 or points[-1][0] - points[0][0] < 0.9 * spec.window_seconds - (
            spec.window_seconds / spec.buckets
        ):
            return
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        half = len(points) // 2
        slopes = [
            least_squares_slope(xs, ys),
            least_squares_slope(xs[:half], ys[:half]),
            least_squares_slope(xs[half:], ys[half:]),
        ]
        slope = slopes[0]
        if slope is None or any(s is None or s <= spec.slope_above for s in slopes):
            ctx.report(self, run, rank, metric, step, False)
            return
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        start = mean_y + slope * (xs[0] - mean_x)
        growth = slope * (xs[-1] - xs[0]) / start if start > 0 else math.inf
        holding = growth >= spec.min_growth_fraction
        extra = {
            "slope": slope,
            "growth": growth,
            "window_seconds": spec.window_seconds,
            "start": start,
        }
        ctx.report(self, run, rank, metric, step, holding, value, spec.slope_above, extra)


@dataclass
class _InputState:
    waits: dict[int, float] = field(default_factory=dict)  # rank -> smoothed wait fraction
    utils: dict[str, float] = field(default_factory=dict)  # gpu metric -> latest util
    sustain: _Sustain = field(default_factory=_Sustain)


class InputBoundRule(Rule[InputBoundSpec]):
    """GPUs idle while a rank waits on its data loader, per run (rank -1)."""

    oneshot = False
    record_level = True

    def __init__(self, name: str, spec: InputBoundSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self.util_match = MetricPattern([spec.util_metric])

    def wants(self, metric: str) -> bool:
        spec = self.spec
        return metric in (spec.metric, spec.step_time_metric) or self.util_match(metric)

    def on_sample(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metric: str,
        value: float,
    ) -> None:
        if not self.util_match(metric) or not _finite(value):
            return
        state = ctx.state(self, run, -1, "", _InputState)
        if state is not None and (metric in state.utils or len(state.utils) < 1024):
            state.utils[metric] = value

    def on_record(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metrics: Mapping[str, Any],
    ) -> None:
        spec = self.spec
        state = ctx.state(self, run, -1, "", _InputState)
        if state is None:
            return
        step_time = _number(metrics.get(spec.step_time_metric))
        if step_time is None or step_time <= 0:
            return  # evaluated on trainer steps; GPU samples only update the utilisation
        wait = _number(metrics.get(spec.metric, 0.0))
        if wait is not None and wait >= 0 and (rank in state.waits or len(state.waits) < 4096):
            fraction = min(wait / step_time, 1.0)
            old = state.waits.get(rank)
            state.waits[rank] = fraction if old is None else old + spec.smoothing * (fraction - old)
        if not state.waits or not state.utils:
            return
        worst_rank, fraction = max(state.waits.items(), key=lambda item: item[1])
        util = max(state.utils.values())
        crossed = util < spec.util_below and fraction > spec.wait_fraction_above
        holding = state.sustain.update(crossed, None, t, 1, spec.for_seconds)
        extra = {"wait_fraction": fraction, "util": util, "worst_rank": worst_rank}
        ctx.report(self, run, -1, "", step, holding, fraction, spec.wait_fraction_above, extra)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if _finite(number) else None


# -- event rules ----------------------------------------------------------------------------------
class StalledRule(Rule[StalledSpec]):
    """No trainer record for ``after_seconds`` from a rank that has not said bye."""

    oneshot = False

    def __init__(self, name: str, spec: StalledSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self._quiet_since: dict[tuple[str, int], float] = {}  # rank -> last record of its stall

    def on_tick(self, ctx: Context, now: float) -> None:
        after = self.spec.after_seconds
        for key, info in list(ctx.ranks.items()):
            run, rank = key
            if rank < 0 or info.said_bye or info.last_record is None:
                continue
            quiet = now - info.last_record
            since = self._quiet_since.get(key)
            if since is not None and since != info.last_record:
                ctx.report(self, run, rank, "", None, False)  # records came between two ticks
            if quiet >= after:
                self._quiet_since[key] = info.last_record
            else:
                self._quiet_since.pop(key, None)
            ctx.report(self, run, rank, "", None, quiet >= after, quiet, after)

    def forget(self, run: str, rank: int | None) -> None:
        for key in [k for k in self._quiet_since if k[0] == run and (rank is None or k[1] == rank)]:
            del self._quiet_since[key]


class RunDiedRule(Rule[RunDiedSpec]):
    """A trainer gone (its pid vanished, or run_end with a failure) without saying bye."""

    def __init__(self, name: str, spec: RunDiedSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self._pending: dict[tuple[str, int], tuple[float, int | None]] = {}

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        if kind == "process_gone":
            pid = attrs.get("pid")
            pid = pid if isinstance(pid, int) and not isinstance(pid, bool) else None
            if rank < 0 and pid is not None:
                for (owner_run, owner_rank), owner in ctx.ranks.items():
                    if owner_run == run and owner.pid == pid and owner_rank >= 0:
                        rank = owner_rank
                        break
            gone = ctx.ranks.get((run, rank))
            if (gone is None or not gone.said_bye) and len(self._pending) < TABLE_LIMIT:
                self._pending[(run, rank)] = (ctx.now() + self.spec.grace_seconds, pid)
        elif kind in ("bye", "hello"):
            self._pending.pop((run, rank), None)
            if kind == "bye":
                self._pending.pop((run, -1), None)
        elif kind == "run_end":
            self.forget(run, None)
            status = attrs.get("exit_status")
            if not _failed(status):
                return
            if rank >= 0:
                ended = ctx.ranks.get((run, rank))
                said_bye = ended is not None and ended.said_bye
            else:
                infos = [i for (r, k), i in ctx.ranks.items() if r == run and k >= 0]
                said_bye = bool(infos) and all(i.said_bye for i in infos)
            if not said_bye:
                value = _number(status)
                extra = {"reason": "run_end", "exit_status": status, "pid": None}
                ctx.report(self, run, rank, "", None, True, value, None, extra)

    def on_tick(self, ctx: Context, now: float) -> None:
        for key, (deadline, pid) in list(self._pending.items()):
            if now < deadline:
                continue
            del self._pending[key]
            info = ctx.ranks.get(key)
            if info is not None and info.said_bye:
                continue
            extra = {"reason": "process_gone", "exit_status": None, "pid": pid}
            ctx.report(self, key[0], key[1], "", None, True, None, None, extra)

    def forget(self, run: str, rank: int | None) -> None:
        for key in [k for k in self._pending if k[0] == run and (rank is None or k[1] == rank)]:
            del self._pending[key]


def _failed(status: Any) -> bool:
    """A run_end exit status that says the trainer failed (None: unknown, not a failure)."""
    if status is None or isinstance(status, bool):
        return bool(status)
    if isinstance(status, int | float):
        return status != 0
    try:
        return int(str(status)) != 0
    except ValueError:
        return str(status).strip().lower() not in ("", "ok", "success", "0")


class ProbeDropsRule(Rule[ProbeDropsSpec]):
    """A probe's cumulative drop counters went up since its previous report."""

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        dropped = attrs.get("dropped")
        if kind != "probe_stats" or not isinstance(dropped, Mapping):
            return
        seen = ctx.state(self, run, rank, "", dict[str, float])
        if seen is None:
            return
        increase: dict[str, float] = {}
        for reason, raw in dropped.items():
            count = _number(raw)
            if count is None:
                continue
            reason = str(reason)
            before = seen.get(reason, 0.0)
            if count > before:
                increase[reason] = count - before
            if reason in seen or len(seen) < 64:
                seen[reason] = count  # a lower count is a restarted probe: the new baseline
        if increase:
            reasons = ", ".join(f"{r} +{n:g}" for r, n in sorted(increase.items()))
            extra = {"reasons": reasons, "increase": increase, "total": dict(seen)}
            ctx.report(self, run, rank, "", None, True, sum(increase.values()), 0.0, extra)


class EventRule(Rule[EventSpec]):
    """Passes an event through (a sink's own alert), with cooldown and destinations."""

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        spec = self.spec
        if kind != spec.event:
            return
        source = str(attrs.get(spec.key_attr, "")) if spec.key_attr else ""
        detail = str(attrs.get("message", "") or kind)[:2000]
        extra = {"event": kind, "source": source, "detail": detail}
        ctx.report(self, run, rank, kind, None, True, None, None, extra, key=source)


RULE_TYPES: Mapping[str, type[Rule[Any]]] = {
    "threshold": ThresholdRule,
    "rate": RateRule,
    "zscore": ZScoreRule,
    "nonfinite": NonfiniteRule,
    "plateau": PlateauRule,
    "overfitting": OverfittingRule,
    "collapse": CollapseRule,
    "trend": TrendRule,
    "input_bound": InputBoundRule,
    "stalled": StalledRule,
    "run_died": RunDiedRule,
    "probe_drops": ProbeDropsRule,
    "event": EventRule,
}
