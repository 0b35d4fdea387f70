"""A run's stored lines read back as series: what export, compare, report, replay, ``top``
and the dashboard read.

``RunLog`` follows ``metrics.jsonl`` from a byte offset and only ever consumes whole
lines, so the same reader serves a finished run (read once) and a live one (call
``update`` again to pick up what the agent appended). Scalars become one ``Series`` per
metric name (every rank's points, with their rank); host samples are flattened to
``system/...`` series; alerts, events, texts and images are kept as they were stored.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from agent.store.layout import METRICS
from probe import protocol
from sinks import schema

#: bytes read per call of ``RunLog.update`` at most, so a live page never waits on a huge file
READ_CHUNK = 64 << 20


@dataclass
class Series:
    """One metric's points in arrival order; ``step`` is NaN for points logged without one."""

    name: str
    steps: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    ranks: list[int] = field(default_factory=list)

    def add(self, step: float, t: float, value: float, rank: int) -> None:
        self.steps.append(step)
        self.times.append(t)
        self.values.append(value)
        self.ranks.append(rank)

    def __len__(self) -> int:
        return len(self.values)

    def arrays(self, rank: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(steps, times, values) as float arrays, of one rank when ``rank`` is given."""
        steps = np.asarray(self.steps, dtype=float)
        times = np.asarray(self.times, dtype=float)
        values = np.asarray(self.values, dtype=float)
        if rank is None:
            return steps, times, values
        keep = np.asarray(self.ranks) == rank
        return steps[keep], times[keep], values[keep]

    def last(self) -> float | None:
        return self.values[-1] if self.values else None

    def finite_values(self) -> np.ndarray:
        values = np.asarray(self.values, dtype=float)
        finite: np.ndarray = values[np.isfinite(values)]
        return finite


@dataclass
class RunLog:
    """Everything a run stored, grown by ``update`` as the agent appends lines."""

    run_dir: Path
    names: Callable[[str], bool] | None = None
    series: dict[str, Series] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    texts: list[dict[str, Any]] = field(default_factory=list)
    images: list[dict[str, Any]] = field(default_factory=list)
    configs: list[dict[str, Any]] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    corrupt_lines: int = 0
    offset: int = 0

    @classmethod
    def read(cls, run_dir: Path, names: Callable[[str], bool] | None = None) -> RunLog:
        """The whole run as stored now."""
        log = cls(Path(run_dir), names)
        while log.update():
            pass
        return log

    def update(self) -> int:
        """Read the whole lines appended since the last call; returns how many were read."""
        path = self.run_dir / METRICS
        try:
            with open(path, "rb") as file:
                file.seek(self.offset)
                chunk = file.read(READ_CHUNK)
        except FileNotFoundError:
            return 0
        end = chunk.rfind(b"\n")
        if end < 0:
            return 0
        count = 0
        for line in chunk[: end + 1].splitlines():
            if not line.strip():
                continue
            count += 1
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.corrupt_lines += 1
                continue
            if isinstance(entry, dict):
                self._take(entry)
            else:
                self.corrupt_lines += 1
        self.offset += end + 1
        return count

    def _take(self, entry: dict[str, Any]) -> None:
        kind = entry.get("kind")
        if not isinstance(kind, str):
            self.corrupt_lines += 1
            return
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        if kind == protocol.SCALARS:
            metrics = entry.get("metrics")
            if isinstance(metrics, dict):
                self._add_points(entry, metrics)
        elif kind == schema.SYSTEM:
            self._add_points(entry, schema.flatten(entry))
        elif kind == schema.ALERT:
            self.alerts.append(entry)
        elif kind == protocol.EVENT:
            self.events.append(entry)
        elif kind == protocol.TEXT:
            self.texts.append(entry)
        elif kind == schema.IMAGE:
            self.images.append(entry)
        elif kind == protocol.CONFIG:
            self.configs.append(entry)

    def _add_points(self, entry: dict[str, Any], metrics: dict[str, Any]) -> None:
        step = _number(entry.get("step"))
        t = _number(entry.get("t"))
        rank = entry.get("rank")
        rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else 0
        wanted = self.names
        for name, raw in metrics.items():
            value = schema.decode_number(raw)
            if value is None or (wanted is not None and not wanted(name)):
                continue
            series = self.series.get(name)
            if series is None:
                series = self.series[name] = Series(name)
            series.add(step, t, value, rank)

    def metric_names(self, system: bool = True) -> list[str]:
        names = sorted(self.series)
        return names if system else [n for n in names if not n.startswith("system/")]

    def config(self) -> dict[str, Any]:
        """The trainer's config records merged in order (later keys win)."""
        merged: dict[str, Any] = {}
        for entry in self.configs:
            values = entry.get("params")
            if isinstance(values, dict):
                merged.update(values)
        return merged


def _number(value: Any) -> float:
    number = schema.decode_number(value)
    return math.nan if number is None else number


def name_filter(patterns: list[str] | None) -> Callable[[str], bool] | None:
    """A metric-name predicate from shell-style patterns (``loss``, ``val/*``); None keeps all."""
    if not patterns:
        return None
    from fnmatch import fnmatchcase

    return lambda name: any(fnmatchcase(name, pattern) for pattern in patterns)


def downsample(y: np.ndarray, buckets: int) -> np.ndarray:
    """Indices of the points to draw: the first, last, min and max of each of ``buckets``
    equal slices of the points, in order. Spikes survive (a max is never averaged away),
    a million points become at most ``4 * buckets``, and the first non-finite value of a
    slice is kept too."""
    n = len(y)
    if n <= 4 * buckets:
        return np.arange(n)
    edges = np.linspace(0, n, buckets + 1).astype(int)
    keep: list[np.ndarray] = []
    finite = np.where(np.isfinite(y), y, np.nan)
    for start, stop in itertools.pairwise(edges):
        if stop <= start:
            continue
        part = finite[start:stop]
        chosen = {start, stop - 1}
        if not np.all(np.isnan(part)):
            chosen.add(start + int(np.nanargmin(part)))
            chosen.add(start + int(np.nanargmax(part)))
        bad = np.flatnonzero(~np.isfinite(y[start:stop]))
        if len(bad):
            chosen.add(start + int(bad[0]))
        keep.append(np.fromiter(sorted(chosen), dtype=int))
    return np.concatenate(keep)
