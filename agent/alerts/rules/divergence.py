"""The ``divergence`` rule: a loss that climbs away from its best and keeps climbing.

A run that diverges without a NaN (a learning rate grown past stability, an
LR range test left running) shows a loss that rises steadily, step after step.
``zscore`` learns a steady rise as its new normal and ``overfitting`` sees only
the validation half of it, so this rule looks at the level itself: the rolling
median of the loss (one spike moves a median by one rank, not by its size)
against the lowest median seen, while most pairs of medians over the window
are rising. A shock that recovers (one corrupt batch) lifts the median in the
``smooth`` samples after it and then falls: at most about two thirds of the
window's pairs rise, so it does not count. The rise must also be a real part
of the ground the run has covered: at least ``min_rise`` of the drop from
the first median to the best. A loss that fell from 2.3 to 0.02 and bumps to
0.06 has tripled, but it is noise near zero, not a run coming apart. The
built-ins ``loss_divergence`` and ``val_loss_divergence`` are its instances.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pydantic

from agent.alerts.rules.base import Context, ExactMetricName, MetricRuleSpec, Rule

SPREAD = 0.15  # each third of the window gives at least this share of the rise: no single jump
NEAR_HIGH = 0.9  # the median is within 10% of the window's highest: climbing, not recovering


class DivergenceSpec(MetricRuleSpec):
    type: Literal["divergence"]
    metric: ExactMetricName
    factor: float = pydantic.Field(default=2.0, gt=1)
    smooth: int = pydantic.Field(default=15, ge=1, le=1000)
    window: int = pydantic.Field(default=50, ge=3, le=1000)
    rising_fraction: float = pydantic.Field(default=0.8, gt=0.5, le=1)
    min_rise: float = pydantic.Field(default=0.1, ge=0, le=1)
    lr_metric: ExactMetricName | None = "lr"
    lr_cut: float = pydantic.Field(default=0.2, gt=0, lt=1)

    default_message: ClassVar[str] = (
        "{name}: smoothed {metric} is {ratio:.1f} times its best {best:.4g} and rising "
        "(now {smoothed:.4g}); the learning rate is not being cut (lr {lr_trend}) "
        "(run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "ratio": 2.0,
        "best": 1.0,
        "smoothed": 2.0,
        "rising_fraction": 0.9,
        "lr": 0.1,
        "lr_trend": "rising",
        "window": 50,
    }


@dataclass
class _DivergenceState:
    last_step: int | None = None
    lr: float | None = None  # the latest lr sample
    best: float = math.inf
    first: float | None = None  # the first median: where the curve started
    raw: collections.deque[float] = field(default_factory=collections.deque)
    medians: collections.deque[float] = field(default_factory=collections.deque)
    lrs: collections.deque[float | None] = field(default_factory=collections.deque)
    rising2: int = 0  # twice the (earlier, later) pairs of `medians` that rose; a tie counts 1

    def restart(self) -> None:
        self.best, self.rising2, self.first = math.inf, 0, None
        self.raw.clear()
        self.medians.clear()
        self.lrs.clear()

    def push_median(self, median: float, window: int) -> None:
        """Append a median, keeping ``rising2`` for the last ``window`` of them in O(window)."""
        if len(self.medians) == window:
            oldest = self.medians.popleft()
            self.lrs.popleft()
            self.rising2 -= sum(2 if m > oldest else 1 if m == oldest else 0 for m in self.medians)
        self.rising2 += sum(2 if median > m else 1 if median == m else 0 for m in self.medians)
        self.medians.append(median)
        self.lrs.append(self.lr)


def _spread(medians: Sequence[float]) -> bool:
    """Whether each third of the window gave at least SPREAD of the (positive) rise over it."""
    last = len(medians) - 1
    points = [medians[last * k // 3] for k in range(4)]
    if min(points) <= 0 or points[-1] <= points[0]:
        return False
    total = math.log(points[-1] / points[0])
    return all(math.log(b / a) >= SPREAD * total for a, b in itertools.pairwise(points))


def _lr_trend(lrs: list[float], lr_cut: float) -> tuple[str, bool]:
    """How the lr moved over the window (rising, steady, falling, not logged) and whether it was
    cut: now below ``1 - lr_cut`` of its highest value in the window."""
    if not lrs:
        return "not logged", False
    first, last, peak = lrs[0], lrs[-1], max(lrs)
    if last < (1.0 - lr_cut) * peak:
        return "cut", True
    if last > first * 1.01:
        return "rising", False
    if last < first * 0.99:
        return "falling", False
    return "steady", False


class DivergenceRule(Rule[DivergenceSpec]):
    """Rolling median of a loss at ``factor`` times its lowest, rising through the window.

    Holds when the median of the last ``smooth`` samples is at least ``factor``
    times the lowest such median of the run, at least ``rising_fraction`` of the
    pairs of the last ``window`` medians rose (a Kendall-style count: a steady
    climb scores near 1, noise 0.5, a jump that recovers at most ~0.7), and the
    lr (``lr_metric``, where logged) is not below ``1 - lr_cut`` of its highest
    value over the window. A rising lr is no excuse: warm-up bumps stay below
    ``factor`` and an LR range test rises too.
    """

    oneshot = False

    def wants(self, metric: str) -> bool:
        return metric == self.spec.metric or metric == self.spec.lr_metric

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
            return  # the nonfinite rule's business
        spec = self.spec
        state = ctx.state(self, run, rank, "", _DivergenceState)
        if state is None:
            return
        if metric != spec.metric:
            state.lr = value
            return
        if step is not None:
            if state.last_step is not None and step < state.last_step:
                state.restart()  # steps went back: a restart from a checkpoint, a new curve
            state.last_step = step
        state.raw.append(value)
        if len(state.raw) > spec.smooth:
            state.raw.popleft()
        if len(state.raw) < spec.smooth:
            return
        ordered = sorted(state.raw)
        middle = len(ordered) // 2
        median = (
            ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
        )
        state.push_median(median, spec.window)
        state.best = min(state.best, median)
        if state.first is None:
            state.first = median
        if len(state.medians) < spec.window:
            return
        pairs = spec.window * (spec.window - 1) // 2
        rising = state.rising2 / (2 * pairs)
        lrs = [lr for lr in state.lrs if lr is not None]
        lr_trend, cut = _lr_trend(lrs, spec.lr_cut)
        ratio = median / state.best if state.best > 0 else math.nan
        holding = (
            ratio >= spec.factor
            and rising >= spec.rising_fraction
            and _spread(state.medians)
            and median >= NEAR_HIGH * max(state.medians)
            and median - state.best >= spec.min_rise * (state.first - state.best)
            and not cut
        )
        extra = {
            "ratio": ratio,
            "best": state.best,
            "smoothed": median,
            "rising_fraction": rising,
            "lr": lrs[-1] if lrs else None,
            "lr_trend": lr_trend,
            "window": spec.window,
        }
        threshold = spec.factor * state.best
        ctx.report(self, run, rank, metric, step, holding, median, threshold, extra)
