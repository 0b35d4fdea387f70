"""What every alert rule is made of: its spec, the engine as it sees it, and shared pieces.

A rule kind is a pydantic ``*Spec`` (one entry of ``alerts.rules`` in the
agent's YAML, checked when the config is loaded, message template included)
and a ``Rule`` the engine runs. Rules keep their per-(run, rank, metric) state
in slots the engine hands out (``Context.state``), so the engine can cap it and
forget a run when it ends; whether a condition holds, cooldowns and delivery
are the engine's business too (``Context.report``).

Data-driven durations and rates (``for_seconds``, per-second rates, memory
growth) use the samples' own times ``t``; stall and grace times use the
engine's injected clock.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Generic, Literal, Protocol, Self, TypeVar

import pydantic

from agent.alerts.rules.advice import DEFAULT_ADVICE, check_advice
from agent.alerts.rules.patterns import MetricPattern, is_glob
from agent.alerts.rules.templates import COMMON_FIELDS, check_template

Severity = Literal["info", "warning", "error", "critical"]
TABLE_LIMIT = 10_000  # entries in a rule's own side tables (power limits, pending deaths)
NAN = float("nan")

# Events the agent tells the engine about besides the wire kinds (hello, bye, run_end, ...).
RECORD: Final = "record"  # a trainer record arrived: the rank is alive
PROCESS_GONE: Final = "process_gone"  # the system sampler saw a trainer's pid vanish

T = TypeVar("T")


# -- values ---------------------------------------------------------------------------------------
def metric_names(metric: str | list[str]) -> list[str]:
    return [metric] if isinstance(metric, str) else list(metric)


def _exact_name(value: str) -> str:
    if not value.strip() or is_glob(value):
        raise ValueError(f"{value!r}: need one exact metric name here, not a glob")
    return value


#: a spec field that names one metric: not blank, not a glob
ExactMetricName = Annotated[str, pydantic.AfterValidator(_exact_name)]


def finite_number(value: Any) -> float | None:
    """A finite int or float from an event or record; None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def integer(value: Any) -> int | None:
    """An int from an event or record (a step, a pid); None for anything else (bools included)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def drop_run(table: MutableMapping[Any, Any], run: str, rank: int | None) -> None:
    """Remove the entries keyed ``(run, rank, ...)`` of ``run`` (of every rank if rank is None)."""
    for key in [k for k in table if k[0] == run and (rank is None or k[1] == rank)]:
        del table[key]


def parent(name: str) -> str:
    """``system/gpu0`` of ``system/gpu0/power_watts``: where a sibling metric lives."""
    return name.rpartition("/")[0]


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
    advice: str | None = None
    destinations: list[str] | None = None
    enabled: bool = True

    default_message: ClassVar[str] = "{name}: {metric}={value} (run {run}, rank {rank})"
    extra_fields: ClassVar[Mapping[str, object]] = {}

    @property
    def template(self) -> str:
        return self.message if self.message is not None else self.default_message

    @property
    def guidance(self) -> str:
        """What to do when the rule fires: ``advice``, or its kind's default."""
        return self.advice if self.advice is not None else DEFAULT_ADVICE.get(self.type, "")

    @pydantic.field_validator("advice")
    @classmethod
    def _advice(cls, value: str | None) -> str | None:
        return None if value is None else check_advice(value)

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
        names = metric_names(value)
        if not names or any(not name.strip() for name in names):
            raise ValueError("metric needs at least one non-empty name or glob")
        return value


# -- what a rule may ask of the engine -------------------------------------------------------------
@dataclass
class RankInfo:
    """What the engine knows of one trainer rank (from hello / record / bye events)."""

    pid: int | None = None
    last_record: float | None = None
    said_bye: bool = False
    first_step: int | None = None  # the first and the latest step of its scalars
    last_step: int | None = None


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
    """One configured rule. ``oneshot`` rules fire on events; the others on conditions.

    The engine feeds a rule only through the hooks its class overrides
    (``wants``/``on_sample``, ``on_record``, ``on_event``, ``on_tick``).
    """

    oneshot: ClassVar[bool] = True
    record_level: ClassVar[bool] = False  # on_record gets the whole sample mapping

    def __init__(self, name: str, spec: S, destinations: Sequence[str]) -> None:
        self.name = name
        self.spec = spec
        self.severity: Severity = spec.severity
        self.cooldown = spec.cooldown
        self.template = spec.template
        self.advice = spec.guidance
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


class MetricRule(Rule[S]):
    """A rule that watches the samples its spec's ``metric`` names or globs match.

    Each glob-matched name keeps a cooldown of its own (each GPU, each stream).
    """

    def __init__(self, name: str, spec: S, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        if not isinstance(spec, MetricRuleSpec):
            raise TypeError(f"rule {name!r}: {type(spec).__name__} has no metric")
        self.match = MetricPattern(metric_names(spec.metric))
        self.keyed_by_metric = self.match.is_glob

    def wants(self, metric: str) -> bool:
        return self.match(metric)


@dataclass
class Sustain:
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
