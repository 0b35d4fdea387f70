"""Rules on any numeric metric: ``threshold``, ``rate``, ``zscore`` and ``nonfinite``.

These are the kinds users write their own rules with; the built-ins
``grad_vanishing``, ``gpu_temperature``, ``gpu_power`` (threshold),
``loss_spike``, ``grad_explosion`` (zscore) and ``nonfinite`` are instances.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, Self

import pydantic

from agent.alerts.rules.base import (
    NAN,
    TABLE_LIMIT,
    Context,
    MetricRule,
    MetricRuleSpec,
    Sustain,
    drop_run,
    metric_names,
    parent,
)
from agent.alerts.rules.patterns import MetricPattern, is_glob


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


class ThresholdRule(MetricRule[ThresholdSpec]):
    """Above/below a bound (or a fraction of a sibling limit), sustained for steps/seconds."""

    oneshot = False

    def __init__(self, name: str, spec: ThresholdSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self.limit_match: MetricPattern | None = None
        if spec.limit_metric is not None:
            siblings = [
                f"{parent(p)}/{spec.limit_metric}".lstrip("/") for p in metric_names(spec.metric)
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
            key = (run, rank, parent(metric))
            if (
                math.isfinite(value)
                and value > 0
                and (key in self._limits or len(self._limits) < TABLE_LIMIT)
            ):
                self._limits[key] = value
            return
        sustain = ctx.state(self, run, rank, metric, Sustain)
        if sustain is None:
            return
        limit = self._limits.get((run, rank, parent(metric))) if self.limit_match else None
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
        drop_run(self._limits, run, rank)


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


@dataclass
class _Previous:
    t: float | None = None
    step: int | None = None
    value: float = 0.0


class RateRule(MetricRule[RateSpec]):
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
        if not math.isfinite(value):
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


@dataclass
class _Ema:
    count: int = 0
    mean: float = 0.0
    var: float = 0.0


class ZScoreRule(MetricRule[ZScoreSpec]):
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
        if spec.above is not None and math.isfinite(value) and value > spec.above:
            extra = {"zscore": NAN, "mean": self._mean(ema), "std": math.sqrt(ema.var)}
            ctx.report(self, run, rank, metric, step, True, value, spec.above, extra)
            fired = True
        if not math.isfinite(value) or (spec.log and value <= 0):
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


class NonfiniteSpec(MetricRuleSpec):
    type: Literal["nonfinite"]
    flags: list[str] = pydantic.Field(default_factory=list)

    default_message: ClassVar[str] = (
        "{name}: {metric}={value} (run {run}, rank {rank}, step {step})"
    )


class NonfiniteRule(MetricRule[NonfiniteSpec]):
    """A NaN/inf value of ``metric``, or a positive value of a ``flags`` metric."""

    oneshot = False

    def __init__(self, name: str, spec: NonfiniteSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self.flags = MetricPattern(spec.flags)
        self.match = MetricPattern([*metric_names(spec.metric), *spec.flags])
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
        holding = not value <= 0 if self.flags(metric) else not math.isfinite(value)
        ctx.report(self, run, rank, metric, step, holding, value)
