"""Window and epoch summaries of a run's scalars, step-time percentiles and throughput.

The trainer logs raw per-step numbers, but people read training in windows ("the last
100 steps"), in epochs, and in the tail of the step-time distribution (p99 shows stragglers
and data stalls). The agent works these out once, on its analysis thread, so that every
sink shows the same figures. One :class:`Summaries` serves one thread: no locks.

**Windows** are aligned on step numbers. Window ``n`` of a (run, rank) holds steps
``[n * window_steps, (n + 1) * window_steps)``. It closes when the first line of a later step
arrives, or at :meth:`Summaries.close_run`, so every line of its last step is in it and the
windows of different ranks line up. Lines without a step go into the open window. A line
that is less than one window behind the open window (a late line) goes into the open window.
A line more than one window behind (a restart from a checkpoint) closes the open window and
opens its own. **Epochs** close at an ``epoch_end`` (or ``epoch``) event, and hold every
line since the previous one.

**Summary entries** (``{"kind": "summary", "scope": "window" | "epoch", ...}``) hold, for each
metric: ``count`` (finite values), ``nonfinite`` (NaN/inf, counted and kept out of the other
figures), ``mean``, ``std`` (population, ddof=0, like numpy's default), ``min``, ``max`` and
``last`` (the last finite value). Each of these is None when the metric had no finite value.
``first_step`` is the window's first step seen, ``last_step`` (also ``step``) the highest.
``t_start`` and ``t_end`` are the times of its first and last lines. ``derived`` holds the
figures below, for epochs too.

**Derived scalars**: one ``{"kind": "scalars", ...}`` entry per closed window. It holds only
the figures that could be computed, and the sinks plot them like any other scalars:

=============================  ==============================================================
``step_time_seconds/p50``      ``numpy.percentile`` (linear) of the window's finite
``step_time_seconds/p90``      ``step_time_seconds``. Exact up to ``percentile_samples``
``step_time_seconds/p99``      values; beyond that, a uniform reservoir sample.
``window/steps_per_second``    ``(last_step - first_step) / (t(last_step) - t(first_step))``,
                               with ``t(s)`` the time of step ``s``'s first line.
``window/tokens_per_second``   window mean of ``tokens_per_second``
``window/samples_per_second``  window mean of ``samples_per_second``
=============================  ==============================================================

**Bounds**, so memory stays flat however long the run is:

- ``max_metrics`` names per (run, rank); lines for other names are counted in
  ``refused_values``;
- ``max_streams`` (run, rank) pairs. When a new pair comes and the limit is reached, the
  oldest closed pair is forgotten; if no pair is closed, the new one is refused;
- raw values wait in a segment of at most ``segment_values`` numbers. The segment is then
  reduced with numpy and merged (Chan et al.) into the open window and epoch;
- ``max_pending`` entries wait for :meth:`Summaries.take`; when it is full, the oldest entry
  is dropped and counted;
- history: ``history_series`` series per (run, rank), each of at most ``history_points``
  points. :meth:`Summaries.forget` drops a finished run's history.

Cost on the development machine (2 shared cores, Python 3.11): about 1 us per value, e.g.
11 us for a line of 12 scalars, window closes included.

**History** is the set of series the training dashboard draws (:data:`HISTORY_NAMES`,
``features/*/effective_rank``, ``system/process/*/rss_bytes``). The x value of a point is the
line's step; a line without a step gets the rank's latest step, or the run's latest step over
all ranks when the rank has none (the agent's system samples come without steps). A series
keeps every ``stride``-th observation, with ``stride`` starting at 1. When its buffer is full,
every 2nd point is kept and ``stride`` is doubled, so the kept points stay evenly spaced and
the first one is kept. The latest observation is always returned as the last point.
"""

from __future__ import annotations

import math
import random
from array import array
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from probe import protocol
from sinks import schema

EPOCH_EVENTS = frozenset({"epoch_end", "epoch"})

#: Plain names of the series that history keeps, besides the patterns below.
HISTORY_NAMES = frozenset(
    {
        "loss",
        "val/loss",
        "lr",
        "grad_norm",
        "steps_per_second",
        "tokens_per_second",
        "samples_per_second",
        "window/steps_per_second",
        "window/tokens_per_second",
        "window/samples_per_second",
        "cuda_memory_allocated_bytes",
        "cuda_memory_reserved_bytes",
    }
)

STEP_TIME = "step_time_seconds"
PERCENTILES = (50.0, 90.0, 99.0)
THROUGHPUT_MEANS = {
    "tokens_per_second": "window/tokens_per_second",
    "samples_per_second": "window/samples_per_second",
}

Entry = dict[str, Any]
Series = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]


def is_history_series(name: str) -> bool:
    """Whether the dashboard draws ``name``, so that history keeps it."""
    if name in HISTORY_NAMES:
        return True
    if name.startswith("features/"):
        return name.endswith("/effective_rank")
    return name.startswith("system/process/") and name.endswith("/rss_bytes")


class _Stats:
    """Count, mean and M2 of the finite values, merged batch by batch (Chan et al.)."""

    __slots__ = ("count", "last", "m2", "max", "mean", "min", "nonfinite")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.nonfinite = 0
        self.last: float | None = None

    def merge(
        self, count: int, mean: float, m2: float, low: float, high: float, nonfinite: int
    ) -> None:
        self.nonfinite += nonfinite
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.m2 += m2 + delta * delta * self.count * count / total
        self.count = total
        self.min = min(self.min, low)
        self.max = max(self.max, high)

    def as_dict(self) -> dict[str, Any]:
        if self.count == 0:
            return {
                "mean": None,
                "std": None,
                "min": None,
                "max": None,
                "count": 0,
                "nonfinite": self.nonfinite,
                "last": None,
            }
        return {
            "mean": self.mean,
            "std": math.sqrt(max(self.m2, 0.0) / self.count),
            "min": self.min,
            "max": self.max,
            "count": self.count,
            "nonfinite": self.nonfinite,
            "last": self.last,
        }


NO_STEP = -(1 << 62)  # "no step yet" for a scope's last_step: any real step is above it


class _Scope:
    """One open window or epoch: its stats, step/time bounds and step-time sample.

    Per-line counts and times live on the stream (one update per line, not one per scope):
    a scope keeps the stream's line count at its opening and its first line's time.
    """

    __slots__ = (
        "first_step",
        "first_step_t",
        "last_step",
        "last_step_t",
        "lines0",
        "stats",
        "step_time_seen",
        "step_times",
        "t_start",
    )

    def __init__(self, lines0: int, t_start: float = math.nan) -> None:
        self.stats: dict[str, _Stats] = {}
        self.lines0 = lines0
        self.t_start = t_start
        self.first_step: int | None = None
        self.first_step_t = math.nan
        self.last_step = NO_STEP
        self.last_step_t = math.nan
        self.step_times: list[float] = []
        self.step_time_seen = 0

    def add_step_time(self, value: float, cap: int, rng: random.Random) -> None:
        self.step_time_seen += 1
        if len(self.step_times) < cap:
            self.step_times.append(value)
        else:
            slot = rng.randrange(self.step_time_seen)
            if slot < cap:
                self.step_times[slot] = value

    def derived(self) -> dict[str, float]:
        """The derived figures of the module docstring that this scope can give."""
        out: dict[str, float] = {}
        if self.step_times:
            p50, p90, p99 = np.percentile(np.asarray(self.step_times), PERCENTILES)
            out[f"{STEP_TIME}/p50"] = float(p50)
            out[f"{STEP_TIME}/p90"] = float(p90)
            out[f"{STEP_TIME}/p99"] = float(p99)
        if self.first_step is not None:
            steps = self.last_step - self.first_step
            elapsed = self.last_step_t - self.first_step_t
            if steps > 0 and elapsed > 0:
                out["window/steps_per_second"] = steps / elapsed
        for name, derived_name in THROUGHPUT_MEANS.items():
            stats = self.stats.get(name)
            if stats is not None and stats.count:
                out[derived_name] = stats.mean
        return out


class DecimatedSeries:
    """At most ``points`` evenly spaced (x, y) points of an endless series.

    Keeps every ``stride``-th observation. When the buffer is full, it keeps every 2nd point
    and doubles ``stride``, so the first observation stays and the spacing stays even. The
    latest observation is always returned as the last point. ``add`` costs O(1), amortised.
    """

    __slots__ = ("keep", "last_x", "last_y", "skip", "stride", "tail", "xs", "ys")

    def __init__(self, points: int) -> None:
        if points < 3:
            raise ValueError(f"DecimatedSeries(points={points}): must be at least 3")
        self.keep = (points - 1) // 2 * 2  # even, and one slot left for the latest point
        self.xs = array("d")
        self.ys = array("d")
        self.stride = 1
        self.skip = 0
        self.tail = False
        self.last_x = 0.0
        self.last_y = 0.0

    def __len__(self) -> int:
        return len(self.xs) + self.tail

    def add(self, x: float, y: float) -> None:
        """Take the next observation; it is kept if it falls on the stride."""
        self.last_x, self.last_y = x, y
        if self.skip:
            self.skip -= 1
            self.tail = True
            return
        if len(self.xs) >= self.keep:
            del self.xs[1::2]
            del self.ys[1::2]
            self.stride *= 2
        self.xs.append(x)
        self.ys.append(y)
        self.skip = self.stride - 1
        self.tail = False

    def arrays(self) -> Series:
        """Copies of (x, y) as float64 arrays, the latest observation last."""
        xs = np.frombuffer(self.xs, dtype=np.float64).copy() if self.xs else np.empty(0)
        ys = np.frombuffer(self.ys, dtype=np.float64).copy() if self.ys else np.empty(0)
        if self.tail:
            xs = np.append(xs, self.last_x)
            ys = np.append(ys, self.last_y)
        return xs, ys


class _Metric:
    """One admitted name of a stream: its raw segment and, if drawn, its history."""

    __slots__ = ("buf", "series")

    def __init__(self, series: DecimatedSeries | None) -> None:
        self.buf: list[float] = []
        self.series = series


class _Stream:
    """Everything kept for one (run, rank)."""

    __slots__ = (
        "closed",
        "epoch",
        "epoch_index",
        "last_step",
        "lines",
        "metrics",
        "rank",
        "run",
        "segment",
        "series",
        "t_last",
        "unstarted",
        "win_end",
        "win_start",
        "window",
    )

    def __init__(self, run: str, rank: int) -> None:
        self.run = run
        self.rank = rank
        self.metrics: dict[str, _Metric] = {}
        self.series: dict[str, DecimatedSeries] = {}
        self.segment = 0
        self.lines = 0
        self.t_last = math.nan
        self.unstarted = True  # a scope waits for its first line's time
        self.window = _Scope(0)
        self.epoch = _Scope(0)
        self.epoch_index = 0
        self.win_start: int | None = None
        self.win_end: int | None = None
        self.last_step: int | None = None
        self.closed = False


def _arrays(stream: _Stream) -> dict[str, Series]:
    return {name: series.arrays() for name, series in stream.series.items()}


def _reduce(values: list[float]) -> tuple[int, float, float, float, float, int, float | None]:
    """(count, mean, M2, min, max, nonfinite, last finite) of one segment's values."""
    arr = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(arr)
    nonfinite = 0
    if not finite.all():
        arr = arr[finite]
        nonfinite = len(values) - arr.size
    if arr.size == 0:
        return 0, 0.0, 0.0, math.inf, -math.inf, nonfinite, None
    with np.errstate(over="ignore", invalid="ignore"):  # near the float limit: inf, no warning
        mean = float(arr.mean())
        diff = arr - mean
        m2 = float(np.dot(diff, diff))
    return arr.size, mean, m2, float(arr.min()), float(arr.max()), nonfinite, float(arr[-1])


class Summaries:
    """Per-(run, rank) window and epoch summaries, derived scalars and dashboard history.

    The arguments are the bounds of the module docstring. ``seed`` seeds the step-time
    reservoir sampler, so that the same input always gives the same percentiles.
    """

    def __init__(
        self,
        window_steps: int = 100,
        max_metrics: int = 1_000,
        history_points: int = 2_000,
        history_series: int = 64,
        max_streams: int = 256,
        percentile_samples: int = 4_096,
        segment_values: int = 16_384,
        max_pending: int = 10_000,
        seed: int = 0,
    ) -> None:
        for name, value, least in (
            ("window_steps", window_steps, 1),
            ("max_metrics", max_metrics, 1),
            ("history_points", history_points, 3),
            ("history_series", history_series, 0),
            ("max_streams", max_streams, 1),
            ("percentile_samples", percentile_samples, 1),
            ("segment_values", segment_values, 1),
            ("max_pending", max_pending, 1),
        ):
            if value < least:
                raise ValueError(f"Summaries({name}={value}): must be at least {least}")
        self.window_steps = window_steps
        self.max_metrics = max_metrics
        self.history_points = history_points
        self.history_series = history_series
        self.max_streams = max_streams
        self.percentile_samples = percentile_samples
        self.segment_values = segment_values
        self._streams: dict[tuple[str, int], _Stream] = {}
        self._pending: deque[Entry] = deque()
        self._max_pending = max_pending
        self._rng = random.Random(seed)
        self.refused_values = 0
        self.refused_series = 0
        self.refused_streams = 0
        self.dropped_entries = 0

    def counters(self) -> dict[str, int]:
        """What the bounds turned away, so that nothing is lost silently."""
        return {
            "refused_values": self.refused_values,
            "refused_series": self.refused_series,
            "refused_streams": self.refused_streams,
            "dropped_entries": self.dropped_entries,
        }

    # ----------------------------------------------------------------- input

    def observe(
        self,
        run: str,
        rank: int,
        step: int | None,
        t: float,
        metrics: Mapping[str, float],
        *,
        derived: bool = False,
    ) -> None:
        """Take one scalars line. Windows close here when ``step`` passes the open one.

        ``derived``: a statistic the agent computed later for an earlier step (a feature
        batch's): it joins the open window and the history at its own step, but neither
        closes nor times the window, whose steps and times are the trainer's."""
        stream = self._streams.get((run, rank))
        if stream is None or stream.closed:
            stream = self._open_stream(run, rank)
            if stream is None:
                self.refused_values += len(metrics)
                return
        if stream.unstarted:
            self._start_scopes(stream, t)
        window = stream.window
        if not derived and step is not None and step != stream.last_step:
            end = stream.win_end
            if end is None:
                self._align(stream, step)
            elif step >= end or step < end - 2 * self.window_steps:
                self._close_window(stream, t)
                window = stream.window
                self._align(stream, step)
            stream.last_step = step
            if window.first_step is None:
                window.first_step, window.first_step_t = step, t
            if step > window.last_step:
                window.last_step, window.last_step_t = step, t
            epoch = stream.epoch
            if epoch.first_step is None:
                epoch.first_step, epoch.first_step_t = step, t
            if step > epoch.last_step:
                epoch.last_step, epoch.last_step_t = step, t
        stream.lines += 1
        if not derived:
            stream.t_last = t
        x = step if derived and step is not None else stream.last_step
        if x is None:
            x = self._run_step(run)
        known = stream.metrics
        for name, value in metrics.items():
            metric = known.get(name)
            if metric is None:
                metric = self._admit(stream, name)
                if metric is None:
                    self.refused_values += 1
                    continue
            metric.buf.append(value)
            if metric.series is not None and x is not None:
                metric.series.add(x, value)
        step_time = metrics.get(STEP_TIME)
        if step_time is not None and math.isfinite(step_time) and STEP_TIME in known:
            window.add_step_time(step_time, self.percentile_samples, self._rng)
            stream.epoch.add_step_time(step_time, self.percentile_samples, self._rng)
        stream.segment += len(metrics)
        if stream.segment >= self.segment_values:
            self._flush(stream)

    def observe_event(self, run: str, rank: int, step: int | None, name: str) -> None:
        """Take one ``probe.event``: ``epoch_end`` (or ``epoch``) closes the rank's epoch."""
        if name not in EPOCH_EVENTS:
            return
        stream = self._streams.get((run, rank))
        if stream is not None:
            self._close_epoch(stream)

    def close_run(self, run: str) -> None:
        """The run ended: close every rank's open window and epoch, keep its history."""
        for stream in self._streams.values():
            if stream.run != run:
                continue
            self._close_window(stream)
            self._close_epoch(stream)
            stream.win_start = stream.win_end = None
            stream.last_step = None
            stream.closed = True

    def forget(self, run: str) -> None:
        """Drop everything kept for ``run`` (history too), without emitting anything."""
        for key in [key for key in self._streams if key[0] == run]:
            del self._streams[key]

    # ---------------------------------------------------------------- output

    def take(self) -> list[Entry]:
        """Entries of the windows and epochs closed since the last call, oldest first."""
        out = list(self._pending)
        self._pending.clear()
        return out

    def history(self, run: str, rank: int | None = None) -> dict[str, Series]:
        """The dashboard's series of ``run``: name -> (steps, values), float64 arrays.

        ``rank`` None gives the series of the lowest rank that is not negative (rank 0 in a
        healthy run), plus the series that only other streams of the run have, such as the
        agent's system samples, which it observes as rank -1.
        """
        if rank is not None:
            stream = self._streams.get((run, rank))
            return {} if stream is None else _arrays(stream)
        streams = sorted(
            (s for s in self._streams.values() if s.run == run),
            key=lambda s: (s.rank < 0, abs(s.rank)),
        )
        out: dict[str, Series] = {}
        for stream in streams:
            for name, series in stream.series.items():
                if name not in out:
                    out[name] = series.arrays()
        return out

    # -------------------------------------------------------------- internal

    def _open_stream(self, run: str, rank: int) -> _Stream | None:
        """The stream of a new or closed (run, rank), or None when the streams are full."""
        key = (run, rank)
        stream = self._streams.get(key)
        if stream is not None:
            stream.closed = False
            return stream
        if len(self._streams) >= self.max_streams:
            oldest = next((k for k, s in self._streams.items() if s.closed), None)
            if oldest is None:
                self.refused_streams += 1
                return None
            del self._streams[oldest]
        stream = self._streams[key] = _Stream(run, rank)
        return stream

    def _run_step(self, run: str) -> int | None:
        """The run's latest step over its ranks: the x of a line from a stream without steps."""
        steps = [s.last_step for s in self._streams.values() if s.run == run]
        return max((step for step in steps if step is not None), default=None)

    def _admit(self, stream: _Stream, name: str) -> _Metric | None:
        if len(stream.metrics) >= self.max_metrics:
            return None
        metric = stream.metrics[name] = _Metric(self._series(stream, name))
        return metric

    def _series(self, stream: _Stream, name: str) -> DecimatedSeries | None:
        if not is_history_series(name):
            return None
        series = stream.series.get(name)
        if series is None:
            if len(stream.series) >= self.history_series:
                self.refused_series += 1
                return None
            series = stream.series[name] = DecimatedSeries(self.history_points)
        return series

    @staticmethod
    def _start_scopes(stream: _Stream, t: float) -> None:
        for scope in (stream.window, stream.epoch):
            if math.isnan(scope.t_start):
                scope.t_start = t
        stream.unstarted = False

    def _align(self, stream: _Stream, step: int) -> None:
        start = step - step % self.window_steps
        stream.win_start, stream.win_end = start, start + self.window_steps

    def _flush(self, stream: _Stream) -> None:
        """Reduce the raw segment and merge it into the open window and epoch."""
        window, epoch = stream.window.stats, stream.epoch.stats
        for name, metric in stream.metrics.items():
            if not metric.buf:
                continue
            count, mean, m2, low, high, nonfinite, last = _reduce(metric.buf)
            metric.buf.clear()
            for stats in (window, epoch):
                entry = stats.get(name)
                if entry is None:
                    entry = stats[name] = _Stats()
                entry.merge(count, mean, m2, low, high, nonfinite)
                if last is not None:
                    entry.last = last
        stream.segment = 0

    def _close_window(self, stream: _Stream, t_next: float = math.nan) -> None:
        """Emit the open window (if it had a line) and open the next, starting at ``t_next``."""
        self._flush(stream)
        scope = stream.window
        stream.window = _Scope(stream.lines, t_next)
        if math.isnan(t_next):
            stream.unstarted = True
        if stream.lines == scope.lines0:
            return
        run, rank = stream.run, stream.rank
        step = None if scope.first_step is None else scope.last_step
        index = None if stream.win_start is None else stream.win_start // self.window_steps
        derived = scope.derived()
        self._emit(self._summary(scope, stream.t_last, "window", index, run, rank, derived))
        if derived:
            self._emit(
                {
                    "kind": protocol.SCALARS,
                    "run": run,
                    "rank": rank,
                    "step": step,
                    "t": stream.t_last,
                    "metrics": derived,
                }
            )
            if step is not None:
                for name, value in derived.items():
                    series = self._series(stream, name)
                    if series is not None:
                        series.add(step, value)

    def _close_epoch(self, stream: _Stream) -> None:
        """Emit the open epoch (if it had a line) and open the next."""
        self._flush(stream)
        scope = stream.epoch
        stream.epoch = _Scope(stream.lines)
        stream.unstarted = True
        if stream.lines == scope.lines0:
            return
        derived = scope.derived()
        entry = self._summary(
            scope, stream.t_last, "epoch", stream.epoch_index, stream.run, stream.rank, derived
        )
        self._emit(entry)
        stream.epoch_index += 1

    @staticmethod
    def _summary(
        scope: _Scope,
        t_end: float,
        kind: str,
        index: int | None,
        run: str,
        rank: int,
        derived: dict[str, float],
    ) -> Entry:
        last_step = None if scope.first_step is None else scope.last_step
        return {
            "kind": schema.SUMMARY,
            "scope": kind,
            "index": index,
            "run": run,
            "rank": rank,
            "step": last_step,
            "first_step": scope.first_step,
            "last_step": last_step,
            "t_start": scope.t_start,
            "t_end": t_end,
            "metrics": {name: stats.as_dict() for name, stats in sorted(scope.stats.items())},
            "derived": derived,
        }

    def _emit(self, entry: Entry) -> None:
        if len(self._pending) >= self._max_pending:
            self._pending.popleft()
            self.dropped_entries += 1
        self._pending.append(entry)
