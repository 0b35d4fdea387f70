"""Rules on how training goes: plateau, overfitting, collapse, trend and input_bound.

Each watches particular metrics of a run (losses, feature statistics, memory,
data-loader wait and GPU utilisation) and knows what they mean; the built-ins
``loss_plateau``, ``overfitting``, ``representation_collapse``,
``memory_leak`` and ``input_bound`` are their instances.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import pydantic

from agent.alerts.rules.base import (
    TABLE_LIMIT,
    Context,
    ExactMetricName,
    MetricRule,
    MetricRuleSpec,
    Rule,
    Sustain,
    finite_number,
    least_squares_slope,
)
from agent.alerts.rules.patterns import MetricPattern


class PlateauSpec(MetricRuleSpec):
    type: Literal["plateau"]
    metric: ExactMetricName
    fallback_metric: ExactMetricName | None = None
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
        if not math.isfinite(value):
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


class OverfittingSpec(MetricRuleSpec):
    type: Literal["overfitting"]
    metric: ExactMetricName
    train_metric: ExactMetricName = "loss"
    evaluations: int = pydantic.Field(default=4, ge=2)
    min_rise: float = pydantic.Field(default=0.03, ge=0)
    train_min_fall: float = pydantic.Field(default=0.02, ge=0, lt=1)
    shock_factor: float = pydantic.Field(default=3.0, gt=1)

    default_message: ClassVar[str] = (
        "{name}: {metric} has stayed above its best {best:.4g} for {streak} evaluations (now "
        "{value:.4g}, +{rise:.1%}) while {train_metric} fell {train_fall:.1%} "
        "(run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "rise": 0.1,
        "best": 1.0,
        "streak": 4,
        "train_fall": 0.1,
        "train_metric": "loss",
        "evaluations": 4,
    }


INTERVAL_SAMPLES = 1024  # train samples kept per evaluation interval (every k-th past it)


@dataclass
class _TrainInterval:
    """The train samples between two evaluations: a bounded, evenly thinned set and the max."""

    values: list[float] = field(default_factory=list)
    stride: int = 1
    seen: int = 0
    high: float = -math.inf

    def add(self, value: float) -> None:
        self.high = max(self.high, value)
        if self.seen % self.stride == 0:
            self.values.append(value)
            if len(self.values) >= INTERVAL_SAMPLES:
                del self.values[1::2]
                self.stride *= 2
        self.seen += 1

    def median(self) -> float:
        ordered = sorted(self.values)
        middle = len(ordered) // 2
        if len(ordered) % 2:
            return ordered[middle]
        return (ordered[middle - 1] + ordered[middle]) / 2


@dataclass
class _Evaluation:
    step: float
    val: float
    train: float  # the median train loss of the interval that ended here
    shocked: bool  # a train sample in it was above shock_factor x the previous interval's median


@dataclass
class _OverfitState:
    interval: _TrainInterval = field(default_factory=_TrainInterval)
    last_train: float | None = None
    best: float = math.inf  # the lowest val before the current streak
    streak: int = 0  # evaluations in a row above best x (1 + min_rise)
    count: int = 0
    recent: collections.deque[_Evaluation] = field(default_factory=collections.deque)

    def restart(self) -> None:
        self.interval, self.last_train = _TrainInterval(), None
        self.best, self.streak = math.inf, 0
        self.recent.clear()


class OverfittingRule(Rule[OverfittingSpec]):
    """Validation above its best for ``evaluations`` evaluations in a row while train really falls.

    Each evaluation pairs a ``metric`` value with the median train loss since the
    previous one. It holds when the last ``evaluations`` values are all above
    the best before them by ``min_rise``, the latest is not below the first of
    them (not coming back down), the median train loss fell at each of them and
    by ``train_min_fall`` over them, and no train sample in them jumped above ``shock_factor`` x the
    previous interval's median. Both rising is divergence; a shock's recovery
    falls back and carries its jump: neither holds.
    """

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
        if not math.isfinite(value):
            return
        spec = self.spec
        state = ctx.state(self, run, rank, "", _OverfitState)
        if state is None:
            return
        if metric == spec.train_metric and metric != spec.metric:
            state.interval.add(value)
            return
        interval = state.interval
        shocked = False
        if interval.values:
            train = interval.median()
            shocked = state.last_train is not None and (
                interval.high > spec.shock_factor * state.last_train
            )
            state.interval, state.last_train = _TrainInterval(), train
        if state.last_train is None:
            return
        state.count += 1
        x = float(step) if step is not None else float(state.count)
        if state.recent and x <= state.recent[-1].step:
            state.restart()  # steps went back: a restart, a new curve
            return
        if math.isfinite(state.best) and value > state.best * (1.0 + spec.min_rise):
            state.streak += 1
        else:
            state.streak = 0
            state.best = min(state.best, value)
        state.recent.append(_Evaluation(x, value, state.last_train, shocked))
        while len(state.recent) > spec.evaluations + 1:
            state.recent.popleft()
        if len(state.recent) <= spec.evaluations:
            return
        before, first, now = state.recent[0], state.recent[1], state.recent[-1]
        train_fall = 1.0 - now.train / before.train if before.train > 0 else math.nan
        holding = (
            state.streak >= spec.evaluations
            and now.val >= first.val
            and train_fall >= spec.train_min_fall
            and all(a.train > b.train for a, b in itertools.pairwise(state.recent))
            and not any(e.shocked for e in state.recent)
        )
        extra = {
            "rise": value / state.best - 1.0 if state.best > 0 else math.nan,
            "best": state.best,
            "streak": state.streak,
            "train_fall": train_fall,
            "train_metric": spec.train_metric,
            "evaluations": spec.evaluations,
        }
        threshold = state.best * (1.0 + spec.min_rise)
        ctx.report(self, run, rank, metric, step, holding, value, threshold, extra)


class CollapseSpec(MetricRuleSpec):
    type: Literal["collapse"]
    warmup_batches: int = pydantic.Field(default=0, ge=0)
    baseline_batches: int = pydantic.Field(default=5, ge=1)
    cosine_above: float | None = pydantic.Field(default=0.9, gt=-1, lt=1)
    std_fraction: float | None = pydantic.Field(default=0.35, gt=0, lt=1)
    rank_fraction: float | None = pydantic.Field(default=0.35, gt=0, lt=1)
    effective_rank_below: float | None = None
    collapse_ratio_below: float | None = None
    for_steps: int = pydantic.Field(default=1, ge=1)

    default_message: ClassVar[str] = (
        "{name}: {stream} collapsing: {detail} (run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "stream": "features/h",
        "measure": "mean_pairwise_cosine",
        "baseline": 0.25,
        "detail": "mean_pairwise_cosine 0.97 above 0.9 (baseline 0.25)",
    }


#: the measures a stream's baseline keeps, and which way is healthier (1: higher, -1: lower)
COLLAPSE_MEASURES: Mapping[str, int] = {
    "mean_pairwise_cosine": -1,
    "collapse_ratio": 1,
    "centered_effective_rank": 1,
}


@dataclass
class _CollapseState:
    batches: int = 0
    baseline: dict[str, float] = field(default_factory=dict)
    sustain: Sustain = field(default_factory=Sustain)


@dataclass(frozen=True)
class _Finding:
    measure: str
    value: float
    limit: float
    baseline: float
    text: str


class CollapseRule(MetricRule[CollapseSpec]):
    """A feature stream judged against its own first batches (``features/<stream>/<measure>``).

    The baseline of each measure is its healthiest value over the stream's first
    ``baseline_batches`` batches after ``warmup_batches``: the lowest mean
    pairwise cosine, the highest collapse ratio and centred effective rank. A
    batch of the baseline window is judged against the batches before it, so a
    collapse under way while the baseline forms is judged against its start.
    It fires when the cosine rises above ``cosine_above`` on a stream whose
    baseline was below it (a stream whose rows share a large offset from the
    start has a high cosine and is left to the centred rank), or when the
    collapse ratio or the centred effective rank falls below its fraction of
    the baseline. Ratios against the stream itself, not absolute floors, catch
    partial and dimensional collapse while a healthy stream with a large mean
    offset stays quiet. The measures of one batch arrive in one record, so one
    episode and one cooldown cover a stream; the message names each measure.

    The baselines live in the rule's own table until the run ends, not in the
    engine's slots, which a rank's bye clears: the statistics of a rank's last
    batches usually arrive after its bye, and a restarted rank continues the
    same stream.
    """

    oneshot = False
    record_level = True

    def __init__(self, name: str, spec: CollapseSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self._streams: collections.OrderedDict[tuple[str, int, str], _CollapseState] = (
            collections.OrderedDict()
        )

    def on_record(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metrics: Mapping[str, Any],
    ) -> None:
        streams: dict[str, dict[str, float]] = {}
        for name, raw in metrics.items():
            value = finite_number(raw)
            if value is None or not self.match(name):
                continue
            stream, _, measure = name.rpartition("/")
            if measure in COLLAPSE_MEASURES or measure == "effective_rank":
                streams.setdefault(stream, {})[measure] = value
        for stream, values in streams.items():
            self._judge(ctx, run, rank, step, t, stream, values)

    def _judge(
        self,
        ctx: Context,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        stream: str,
        values: Mapping[str, float],
    ) -> None:
        spec = self.spec
        key = (run, rank, stream)
        state = self._streams.get(key)
        if state is None:
            state = self._streams[key] = _CollapseState()
            while len(self._streams) > TABLE_LIMIT:
                self._streams.popitem(last=False)
        self._streams.move_to_end(key)
        state.batches += 1
        findings = self._floors(values)
        if state.batches > spec.warmup_batches:
            findings += self._against_baseline(values, state.baseline)
            if state.batches <= spec.warmup_batches + spec.baseline_batches:
                for measure, healthier in COLLAPSE_MEASURES.items():
                    value = values.get(measure)
                    old = state.baseline.get(measure)
                    if value is not None and (old is None or (value - old) * healthier > 0):
                        state.baseline[measure] = value
        holding = state.sustain.update(bool(findings), step, t, spec.for_steps, 0.0)
        if not findings:
            ctx.report(self, run, rank, stream, step, False)
            return
        first = findings[0]
        extra = {
            "stream": stream,
            "measure": first.measure,
            "baseline": first.baseline,
            "detail": "; ".join(finding.text for finding in findings),
        }
        ctx.report(self, run, rank, stream, step, holding, first.value, first.limit, extra)

    def forget(self, run: str, rank: int | None) -> None:
        if rank is None:  # the run ended; a rank's bye keeps its streams (see the class)
            for key in [key for key in self._streams if key[0] == run]:
                del self._streams[key]

    def _floors(self, values: Mapping[str, float]) -> list[_Finding]:
        """The absolute floors, when set: any batch, no baseline needed."""
        findings = []
        for measure, floor in (
            ("effective_rank", self.spec.effective_rank_below),
            ("collapse_ratio", self.spec.collapse_ratio_below),
        ):
            value = values.get(measure)
            if floor is not None and value is not None and value < floor:
                text = f"{measure} {value:.3g} below {floor:.3g}"
                findings.append(_Finding(measure, value, floor, math.nan, text))
        return findings

    def _against_baseline(
        self, values: Mapping[str, float], baseline: Mapping[str, float]
    ) -> list[_Finding]:
        spec = self.spec
        findings = []
        cosine, start = values.get("mean_pairwise_cosine"), baseline.get("mean_pairwise_cosine")
        above = spec.cosine_above
        if (
            above is not None
            and cosine is not None
            and start is not None
            and start <= above < cosine
        ):
            text = f"mean_pairwise_cosine {cosine:.3g} above {above:.3g} (baseline {start:.3g})"
            findings.append(_Finding("mean_pairwise_cosine", cosine, above, start, text))
        for measure, fraction in (
            ("collapse_ratio", spec.std_fraction),
            ("centered_effective_rank", spec.rank_fraction),
        ):
            value, start = values.get(measure), baseline.get(measure)
            if fraction is None or value is None or start is None:
                continue
            limit = fraction * start
            if value < limit:
                text = (
                    f"{measure} {value:.3g} below {limit:.3g} "
                    f"({fraction:.0%} of its baseline {start:.3g})"
                )
                findings.append(_Finding(measure, value, limit, start, text))
        return findings


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


@dataclass
class _TrendState:
    first_t: float | None = None
    bucket_start: float | None = None
    sum_t: float = 0.0
    sum_v: float = 0.0
    count: int = 0
    points: collections.deque[tuple[float, float]] = field(default_factory=collections.deque)


class TrendRule(MetricRule[TrendSpec]):
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
        if not math.isfinite(value):
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


class InputBoundSpec(MetricRuleSpec):
    type: Literal["input_bound"]
    metric: ExactMetricName
    step_time_metric: ExactMetricName = "step_time_seconds"
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


@dataclass
class _InputState:
    waits: dict[int, float] = field(default_factory=dict)  # rank -> smoothed wait fraction
    utils: dict[str, float] = field(default_factory=dict)  # gpu metric -> latest util
    sustain: Sustain = field(default_factory=Sustain)


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
        if not self.util_match(metric) or not math.isfinite(value):
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
        step_time = finite_number(metrics.get(spec.step_time_metric))
        if step_time is None or step_time <= 0:
            return  # evaluated on trainer steps; GPU samples only update the utilisation
        wait = finite_number(metrics.get(spec.metric, 0.0))
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
