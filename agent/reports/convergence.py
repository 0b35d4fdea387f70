"""How a run converged, from its loss curve alone: pure functions on arrays.

A report needs more than the last loss. These figures say how much the loss fell
(from the median of its first points to the median of its last), where its
smoothed curve was lowest, how noisy it is around that curve and how many
spikes stand out of the noise, how much loss each thousand steps and each minute
bought, and whether the run was still improving, flat or climbing at its end.

The trend is a centred rolling median, so one spike neither moves it nor hides
behind it. Noise is measured robustly (1.4826 x the median absolute deviation of
the residuals), in log space when every loss is positive, so a spike is judged
against the curve's own noise at any loss scale. Lower is better throughout.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

#: fewer finite points than this and there is no curve to judge
MIN_POINTS = 10
#: the initial and final loss are medians of this share of the points at each end (>= 3)
EDGE_FRACTION = 0.05
#: a point is a spike when its residual is this many noise deviations above the trend ...
SPIKE_SIGMAS = 6.0
#: ... and at least this far above it (a 25% jump), so a very smooth curve's ripples are not
SPIKE_MIN_JUMP = 0.25
#: the end of the run (its last 20% of points) compared with the 20% before it
TAIL_FRACTION = 0.2
#: the tail improving by more than 1% is still improving; rising by more than 2% is climbing
IMPROVING_CHANGE = 0.01
RISING_CHANGE = 0.02
#: the rolling median's window: n / 25 points, odd, between these bounds
TREND_WINDOW = (5, 201)
#: validation is judged on rolling medians of this many evaluations (or a tenth of them)
VALIDATION_WINDOW = 3
#: spike steps kept in the result
MAX_SPIKES_LISTED = 20
#: rows of the rolling window computed at a time (bounded memory on long runs)
CHUNK = 20_000

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Convergence:
    """The loss curve's convergence figures; ``reduction`` and ``relative_noise`` are
    fractions (0.42 is 42%)."""

    points: int
    nonfinite: int
    first_nonfinite_step: float | None
    first_step: float
    last_step: float
    initial: float
    final: float
    reduction: float
    best: float
    best_step: float
    relative_noise: float
    spikes: int
    spike_steps: list[float] = field(default_factory=list)
    per_1k_steps: float | None = None
    per_minute: float | None = None
    steps_per_second: float | None = None
    step_at_90: float | None = None
    share_of_run_at_90: float | None = None
    tail_change: float = 0.0
    state: str = "plateau"  # improving | plateau | rising

    def as_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


@dataclass(frozen=True)
class Validation:
    """A validation metric's best and last evaluation, and how far its recent evaluations
    sit above its best stretch: ``above_best`` compares the median of the last
    ``window`` evaluations with the lowest rolling median of ``window`` evaluations, so
    one lucky or unlucky evaluation moves neither."""

    evaluations: int
    best: float
    best_step: float
    last: float
    last_step: float
    window: int
    smoothed_best: float
    smoothed_best_step: float
    recent: float
    above_best: float  # (recent - smoothed_best) / |smoothed_best|

    def as_dict(self) -> dict[str, Any]:
        return _finite(asdict(self))


def analyse(
    steps: npt.ArrayLike, values: npt.ArrayLike, times: npt.ArrayLike | None = None
) -> Convergence | None:
    """The convergence of one loss curve (one rank's points); None with under MIN_POINTS
    finite values. ``steps`` may be NaN where a point had none (its index is used then);
    ``times`` are epoch seconds, for the per-minute figures."""
    x, y, t = _ordered(steps, values, times)
    finite = np.isfinite(y)
    nonfinite = int(len(y) - finite.sum())
    first_bad = float(x[~finite][0]) if nonfinite else None
    x, y, t = x[finite], y[finite], t[finite]
    n = len(y)
    if n < MIN_POINTS:
        return None
    trend = rolling_median(y, trend_window(n))
    residual = _residual(y, trend)
    centre = float(np.median(residual))
    noise = 1.4826 * float(np.median(np.abs(residual - centre)))
    spike_steps = _spikes(x, residual, noise, positive=bool(np.all(y > 0)))
    edge = max(3, int(n * EDGE_FRACTION))
    initial, final = float(np.median(y[:edge])), float(np.median(y[-edge:]))
    drop = initial - final
    reduction = drop / abs(initial) if initial else 0.0
    best_index = int(np.argmin(trend))
    span_steps = float(x[-1] - x[0])
    span_seconds = float(t[-1] - t[0]) if np.isfinite(t[0]) and np.isfinite(t[-1]) else math.nan
    step_at_90 = share_at_90 = None
    if drop > 0:
        reached = np.flatnonzero(trend <= initial - 0.9 * drop)
        if len(reached):
            step_at_90 = float(x[reached[0]])
            share_at_90 = float(step_at_90 - x[0]) / span_steps if span_steps > 0 else None
    tail_change, state = _tail(y)
    return Convergence(
        points=n,
        nonfinite=nonfinite,
        first_nonfinite_step=first_bad,
        first_step=float(x[0]),
        last_step=float(x[-1]),
        initial=initial,
        final=final,
        reduction=reduction,
        best=float(trend[best_index]),
        best_step=float(x[best_index]),
        relative_noise=noise,
        spikes=len(spike_steps),
        spike_steps=spike_steps[:MAX_SPIKES_LISTED],
        per_1k_steps=drop / span_steps * 1000.0 if span_steps > 0 else None,
        per_minute=drop / (span_seconds / 60.0) if span_seconds > 0 else None,
        steps_per_second=span_steps / span_seconds if span_seconds > 0 else None,
        step_at_90=step_at_90,
        share_of_run_at_90=share_at_90,
        tail_change=tail_change,
        state=state,
    )


def validation(steps: npt.ArrayLike, values: npt.ArrayLike) -> Validation | None:
    """Best, last and recent level of a validation metric (lower is better); None without a
    finite value."""
    x, y, _ = _ordered(steps, values, None)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if not len(y):
        return None
    best = int(np.argmin(y))
    window = max(VALIDATION_WINDOW, len(y) // 10)
    window = min(window if window % 2 else window + 1, len(y) if len(y) % 2 else len(y) - 1)
    smooth = rolling_median(y, window)
    low = int(np.argmin(smooth))
    recent = float(np.median(y[-window:]))
    above = (recent - float(smooth[low])) / abs(float(smooth[low])) if smooth[low] else 0.0
    return Validation(
        evaluations=len(y),
        best=float(y[best]),
        best_step=float(x[best]),
        last=float(y[-1]),
        last_step=float(x[-1]),
        window=window,
        smoothed_best=float(smooth[low]),
        smoothed_best_step=float(x[low]),
        recent=recent,
        above_best=above,
    )


def growth(values: npt.ArrayLike) -> float | None:
    """How far a metric has climbed by the end: the median of its last quarter over the
    lowest median of the three quarters before (1.0: flat; 2.0: doubled). For the gradient
    norm, whose rise with spikes in the loss says the LR is too high. None under 8 points
    or when a quarter's median is not positive."""
    y = np.asarray(values, dtype=float)
    y = y[np.isfinite(y)]
    if len(y) < 8:
        return None
    quarters = [float(np.median(part)) for part in np.array_split(y, 4)]
    lowest = min(quarters[:3])
    if lowest <= 0 or quarters[3] <= 0:
        return None
    return quarters[3] / lowest


def rolling_median(y: Floats, window: int) -> Floats:
    """Centred rolling median of ``y`` over ``window`` points (odd), the ends padded with
    their edge values; computed in chunks so a million points stay within a few MB."""
    half = window // 2
    padded = np.pad(y, half, mode="edge")
    out = np.empty(len(y))
    views = np.lib.stride_tricks.sliding_window_view(padded, window)
    for start in range(0, len(y), CHUNK):
        out[start : start + CHUNK] = np.median(views[start : start + CHUNK], axis=1)
    return out


def trend_window(n: int) -> int:
    """The rolling median's window for ``n`` points."""
    low, high = TREND_WINDOW
    window = min(max(n // 25, low), high)
    return window if window % 2 else window + 1


def _ordered(
    steps: npt.ArrayLike, values: npt.ArrayLike, times: npt.ArrayLike | None
) -> tuple[Floats, Floats, Floats]:
    """The points sorted by step (stable), the index standing in for missing steps."""
    y = np.asarray(values, dtype=float)
    x = np.asarray(steps, dtype=float)
    t = np.full(len(y), math.nan) if times is None else np.asarray(times, dtype=float)
    if len(x) != len(y) or len(t) != len(y):
        raise ValueError(f"steps ({len(x)}), values ({len(y)}), times ({len(t)}) differ")
    if not np.all(np.isfinite(x)):
        x = np.arange(len(y), dtype=float)
    order = np.argsort(x, kind="stable")
    return x[order], y[order], t[order]


def _residual(y: Floats, trend: Floats) -> Floats:
    if np.all(y > 0) and np.all(trend > 0):
        log_ratio: Floats = np.log(y) - np.log(trend)
        return log_ratio
    relative: Floats = (y - trend) / np.maximum(np.abs(trend), 1e-12)
    return relative


def _spikes(x: Floats, residual: Floats, noise: float, positive: bool) -> list[float]:
    """The step of the highest point of each run of consecutive points above the bar."""
    jump = math.log1p(SPIKE_MIN_JUMP) if positive else SPIKE_MIN_JUMP
    above = residual > max(SPIKE_SIGMAS * noise, jump)
    steps: list[float] = []
    index = np.flatnonzero(above)
    if not len(index):
        return steps
    groups = np.split(index, np.flatnonzero(np.diff(index) > 1) + 1)
    for group in groups:
        steps.append(float(x[group[np.argmax(residual[group])]]))
    return steps


def _tail(y: Floats) -> tuple[float, str]:
    """The last TAIL_FRACTION of the points against the same share before them."""
    size = max(2, int(len(y) * TAIL_FRACTION))
    tail, prior = y[-size:], y[-2 * size : -size]
    before = float(np.median(prior))
    change = (before - float(np.median(tail))) / abs(before) if before else 0.0
    if change > IMPROVING_CHANGE:
        return change, "improving"
    if change < -RISING_CHANGE:
        return change, "rising"
    return change, "plateau"


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities as None, for JSON."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in values.items()
    }
