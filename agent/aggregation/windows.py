"""Job windows: every rank's summary of window ``n``, gathered into one view of the job.

Each node agent closes its ranks' windows on their own (``agent/analysis/summaries.py``)
and forwards the summaries. Cross-rank statistics need the same window from every rank,
so :class:`JobWindows` holds them by window index until the window can be judged:

- **complete**: every expected rank reported the index;
- **stale**: every expected rank that has not reported it has reported a later index
  (a rank's summaries arrive in order, so it will never send this one: the window had no
  line of it), or ``max_wait_seconds`` passed since the window's first summary (a rank
  that died or lags far behind);
- **evicted**: more than ``max_open`` windows are open; the oldest goes as it is.

A released window that was not complete says which ranks are ``missing``. The expected
ranks are ``range(world_size)`` once a summary carries ``world_size``, else every rank
seen so far. Ranks are global ranks. A torchrun restart (a higher ``restart`` count for
a rank) replaces that rank's summaries of the older restart in the open windows; a
summary of an older restart than the rank's newest is dropped. A summary for a window
already released (of the same or an older restart) is late: dropped and counted.
One :class:`JobWindows` serves one thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sinks import schema

Summary = dict[str, Any]


@dataclass
class JobWindow:
    """Window ``index`` of the job: each rank's summary, and the expected ranks that lack one."""

    index: int
    ranks: dict[int, Summary]
    missing: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def step(self) -> int | None:
        """The highest step of the window over its ranks (None when no rank had a step)."""
        steps = [s["step"] for s in self.ranks.values() if isinstance(s.get("step"), int)]
        return max(steps) if steps else None

    @property
    def run(self) -> str | None:
        for summary in self.ranks.values():
            run = summary.get("run")
            if isinstance(run, str):
                return run
        return None

    def host(self, rank: int) -> str | None:
        host = self.ranks[rank].get("host")
        return host if isinstance(host, str) else None

    def local_rank(self, rank: int) -> int | None:
        return summary_int(self.ranks[rank].get("local_rank"))

    def restart(self, rank: int) -> int:
        return restart_of(self.ranks[rank])


class _Open:
    __slots__ = ("first_seen", "index", "ranks")

    def __init__(self, index: int, first_seen: float) -> None:
        self.index = index
        self.first_seen = first_seen
        self.ranks: dict[int, Summary] = {}


def summary_int(value: Any) -> int | None:
    """An integer field of a summary (rank, index, restart, ...), None if it is not one."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def restart_of(summary: Summary) -> int:
    """The torchrun restart count a summary came from (0 when the node did not say)."""
    return summary_int(summary.get("restart")) or 0


class JobWindows:
    """Gathers rank window summaries by index; ``ready()`` gives the windows done with."""

    def __init__(
        self,
        *,
        max_wait_seconds: float = 60.0,
        max_open: int = 64,
        max_ranks: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        if max_wait_seconds <= 0:
            raise ValueError(f"max_wait_seconds must be > 0, got {max_wait_seconds}")
        self.max_wait_seconds = max_wait_seconds
        self.max_open = max_open
        self.max_ranks = max_ranks
        self.clock = clock
        self._open: dict[int, _Open] = {}
        self._released: list[JobWindow] = []
        self._latest: dict[int, int] = {}  # rank -> highest index reported (its restart)
        self._restart: dict[int, int] = {}  # rank -> newest restart count seen
        self._world_size: int | None = None
        self._floor = -1  # highest index released ...
        self._floor_restart = -1  # ... of this restart count
        self.counters = {
            "summaries": 0,
            "refused": 0,  # not a window summary with an index and a rank
            "late": 0,  # for a window already released
            "superseded": 0,  # of an older restart than the rank's newest
            "released": 0,
            "incomplete": 0,  # released with missing ranks (stale or evicted)
            "evicted": 0,  # released because max_open windows were open
        }

    @property
    def expected(self) -> list[int]:
        if self._world_size is not None:
            return list(range(self._world_size))
        return sorted(self._restart)

    @property
    def open_windows(self) -> int:
        return len(self._open)

    def add(self, summary: Summary) -> None:
        """Take one rank's window summary (with ``host``, ``local_rank``, ``restart`` added)."""
        index, rank = summary_int(summary.get("index")), summary_int(summary.get("rank"))
        if (
            summary.get("kind") != schema.SUMMARY
            or summary.get("scope") != "window"
            or index is None
            or index < 0
            or rank is None
            or rank < 0
            or (rank not in self._restart and len(self._restart) >= self.max_ranks)
        ):
            self.counters["refused"] += 1
            return
        restart = restart_of(summary)
        known = self._restart.get(rank)
        if known is not None and restart < known:
            self.counters["superseded"] += 1
            return
        if index <= self._floor and restart <= self._floor_restart:
            self.counters["late"] += 1
            return
        if known is not None and restart > known:
            self._latest.pop(rank, None)
            for held in self._open.values():
                old = held.ranks.get(rank)
                if old is not None and restart_of(old) < restart:
                    del held.ranks[rank]
        self._restart[rank] = restart
        world_size = summary_int(summary.get("world_size"))
        if world_size is not None and world_size > 0:
            self._world_size = world_size
        self.counters["summaries"] += 1
        window = self._open.get(index)
        if window is None:
            if len(self._open) >= self.max_open:
                oldest = min(self._open)
                self.counters["evicted"] += 1
                self._release(self._open.pop(oldest), self.expected)
            window = self._open[index] = _Open(index, self.clock())
        window.ranks[rank] = summary
        if index > self._latest.get(rank, -1):
            self._latest[rank] = index

    def ready(self) -> list[JobWindow]:
        """The windows released since the last call (complete, stale or evicted), by index."""
        expected = self.expected
        if self._open:
            now = self.clock()
            # Every expected rank has reported every index up to ``through``, or a later one.
            through = min((self._latest.get(rank, -1) for rank in expected), default=-1)
            for index in sorted(self._open):
                window = self._open[index]
                done = (
                    index <= through
                    or now - window.first_seen >= self.max_wait_seconds
                    or (
                        len(window.ranks) >= len(expected)
                        and all(rank in window.ranks for rank in expected)
                    )
                )
                if done:
                    self._release(self._open.pop(index), expected)
        released, self._released = self._released, []
        released.sort(key=lambda w: w.index)
        return released

    def _release(self, window: _Open, expected: list[int]) -> None:
        missing = [rank for rank in expected if rank not in window.ranks]
        self.counters["released"] += 1
        if missing:
            self.counters["incomplete"] += 1
        restart = max(map(restart_of, window.ranks.values()), default=0)
        if restart > self._floor_restart:
            self._floor, self._floor_restart = window.index, restart
        else:
            self._floor = max(self._floor, window.index)
        self._released.append(JobWindow(window.index, window.ranks, missing))
