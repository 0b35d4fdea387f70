"""The dashboard's copy of each run it shows: a ``RunLog`` followed as the agent appends,
its points moved into numpy columns.

``RunLog`` keeps points in Python lists (about 32 bytes a number); a run of a million
steps and ten metrics would take over a gigabyte that way, so after every ``update`` the
new points are moved into growable float64 columns (8 bytes a number) and the lists are
emptied. Reads are cheap after that: a chart asks for a step range, gets at most
``4 * buckets`` points, and ``downsample`` keeps each bucket's min and max so a spike
in a million steps still shows.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.store.layout import METRICS
from agent.store.series import RunLog, downsample

#: runs held in memory at once; the least recently viewed is dropped (and re-read if asked for)
MAX_RUNS = 8
#: most recent texts, images and events kept per run (alerts are all kept)
KEEP = 50


class Columns:
    """One metric's points as arrays that grow by doubling."""

    def __init__(self) -> None:
        self.size = 0
        self._steps = np.empty(64)
        self._times = np.empty(64)
        self._values = np.empty(64)
        self._ranks = np.empty(64, dtype=np.int32)

    def extend(
        self, steps: list[float], times: list[float], values: list[float], ranks: list[int]
    ) -> None:
        n = len(values)
        need = self.size + n
        if need > len(self._values):
            capacity = max(need, 2 * len(self._values))
            for name in ("_steps", "_times", "_values", "_ranks"):
                old = getattr(self, name)
                new = np.empty(capacity, dtype=old.dtype)
                new[: self.size] = old[: self.size]
                setattr(self, name, new)
        end = self.size + n
        self._steps[self.size : end] = steps
        self._times[self.size : end] = times
        self._values[self.size : end] = values
        self._ranks[self.size : end] = ranks
        self.size = end

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = self.size
        return self._steps[:n], self._times[:n], self._values[:n], self._ranks[:n]


@dataclass
class RunView:
    """A run as the dashboard holds it."""

    run_dir: Path
    log: RunLog
    columns: dict[str, Columns] = field(default_factory=dict)
    last_read: float = 0.0
    _ranks: tuple[int, list[int]] | None = None

    def refresh(self) -> None:
        """Take what the agent had appended when the call began (a run growing faster than
        it is read never keeps a page waiting: the rest comes with the next refresh)."""
        end = stored_size(self.run_dir)
        while self.log.offset < end and self.log.update():
            for name, series in self.log.series.items():
                if not series.values:
                    continue
                columns = self.columns.get(name)
                if columns is None:
                    columns = self.columns[name] = Columns()
                columns.extend(series.steps, series.times, series.values, series.ranks)
                series.steps.clear()
                series.times.clear()
                series.values.clear()
                series.ranks.clear()
            for kept in (self.log.texts, self.log.images, self.log.events):
                del kept[:-KEEP]
        self.last_read = time.monotonic()

    def ranks(self) -> list[int]:
        """The trainer ranks (0 and up) that stored points."""
        size = sum(columns.size for columns in self.columns.values())
        if self._ranks is None or self._ranks[0] != size:
            found: set[int] = set()
            for columns in self.columns.values():
                found.update(int(r) for r in np.unique(columns.view()[3]) if r >= 0)
            self._ranks = (size, sorted(found))
        return self._ranks[1]

    def names(self) -> list[str]:
        return sorted(self.columns)

    def last(self, name: str) -> float | None:
        columns = self.columns.get(name)
        if columns is None or columns.size == 0:
            return None
        return float(columns.view()[2][-1])

    def series(
        self,
        name: str,
        buckets: int,
        lo: float | None = None,
        hi: float | None = None,
        rank: int | None = None,
    ) -> dict[str, Any] | None:
        """``{"axis", "x", "y", "count"}`` for a chart: x is the step (the time for series
        logged without steps, such as ``system/...``), y has None for non-finite values;
        one rank's points (the first point's rank unless ``rank`` is given), at most
        ``4 * buckets`` of them between ``lo`` and ``hi``."""
        columns = self.columns.get(name)
        if columns is None or columns.size == 0:
            return None
        steps, times, values, ranks = columns.view()
        chosen = int(ranks[0]) if rank is None else rank
        keep = ranks == chosen
        if not keep.any():  # host samples (rank -1) on a page that shows one rank
            chosen = int(ranks[0])
            keep = ranks == chosen
        by_step = not math.isnan(steps[0])
        x = (steps if by_step else times)[keep]
        y = values[keep]
        if len(x) and np.any(np.diff(x) < 0):
            order = np.argsort(x, kind="stable")
            x, y = x[order], y[order]
        count = len(x)
        if lo is not None or hi is not None:
            start = 0 if lo is None else max(int(np.searchsorted(x, lo, "left")) - 1, 0)
            stop = count if hi is None else min(int(np.searchsorted(x, hi, "right")) + 1, count)
            x, y = x[start:stop], y[start:stop]
        picked = downsample(y, buckets)
        x, y = x[picked], y[picked]
        return {
            "axis": "step" if by_step else "time",
            "rank": chosen,
            "count": count,
            "x": x.tolist(),
            "y": [v if math.isfinite(v) else None for v in y.tolist()],
        }


class RunCache:
    """The runs the dashboard has open, newest use last; at most ``limit`` of them."""

    def __init__(self, limit: int = MAX_RUNS) -> None:
        self.limit = limit
        self._views: OrderedDict[Path, RunView] = OrderedDict()

    def get(self, run_dir: Path) -> RunView:
        """The run, brought up to date with what is stored now."""
        view = self._views.pop(run_dir, None)
        if view is None:
            view = RunView(run_dir, RunLog(run_dir))
        self._views[run_dir] = view
        while len(self._views) > self.limit:
            self._views.popitem(last=False)
        view.refresh()
        return view


def stored_size(run_dir: Path) -> int:
    """Bytes of the run's metrics file now (what the live pages watch for growth)."""
    try:
        return (run_dir / METRICS).stat().st_size
    except OSError:
        return 0
