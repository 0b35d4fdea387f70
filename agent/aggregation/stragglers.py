"""Straggler detection: the rank that holds the whole job back, found from window summaries.

The scores are those of NVIDIA's nvidia-resiliency-ext straggler detection, computed here
from what the ranks already send instead of from extra collectives in the trainer:

- a rank's **section time** for a window is the median (``<section>/p50`` when the
  summary has it, else the window mean) of the first section of ``sections`` that every
  rank of the window logged (``compute_seconds``, then ``forward_seconds`` from
  ``probe.watch``, then ``step_time_seconds``, whose p50 every summary derives);
- **relative score** = the fastest rank's section time / this rank's (1 for the fastest);
- **individual score** = this rank's best (lowest) section time so far / its current one.

Both scores are taken with ``floor_seconds`` added to each time, so that a section of a
fraction of a millisecond, where the host's timer noise is as large as the section, cannot
make a straggler: ``(fastest + floor) / (this + floor)``. On a real model the floor is
small against the section and changes nothing.

A rank is flagged when its relative score stays below ``threshold`` for ``consecutive``
windows in a row it reported, or its individual score does while it is also behind the
fastest rank (relative below ``(1 + threshold) / 2``): a rank that slows down together with
every other rank is a slower job, not a straggler, and on a shared machine a rank's own
best window is an outlier its later windows rarely match. It gives one finding per
episode; a window with both scores back at or above the threshold ends the episode, and a
later slowdown flags it again.

Why not step time first: under DDP every rank's step takes as long as the slowest rank's,
since all of them wait for it in the gradient all-reduce, so step times are all alike and
the relative score cannot point at anyone. The forward pass has no collective, so it
shows the slow rank. A whole job that slows down over time (a failing link, every GPU
throttled) shows in every rank's individual score, in the job view and the job scalars,
without blaming a rank.

The **collective-wait signature** confirms a suspect: ``backward_seconds`` (from
``probe.watch``) includes the all-reduce wait, and the straggler is the rank that waits
least, since the others wait for it. A finding carries each rank's backward time and
whether the flagged rank's is the smallest.

State is one best time per (rank, section) and one streak per rank: bounded by the ranks
of the job. A rank's state starts afresh when its ``restart`` count changes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from agent.aggregation.config import StragglerSettings
from agent.aggregation.windows import JobWindow, Summary

BACKWARD = "backward_seconds"


@dataclass
class StragglerFinding:
    """A rank flagged as a straggler in window ``index``."""

    rank: int
    host: str | None
    local_rank: int | None
    run: str | None
    index: int
    step: int | None
    section: str
    seconds: float  # this rank's section time
    fastest_seconds: float  # the fastest rank's
    best_seconds: float  # this rank's best so far
    relative: float
    individual: float
    threshold: float
    backward: dict[int, float] = field(default_factory=dict)  # rank -> backward time
    waits_least: bool | None = None  # whether this rank's backward time is the smallest

    @property
    def reason(self) -> str:
        """Which score is low: ``relative``, ``individual`` or ``both``."""
        low_relative = self.relative < self.threshold
        low_individual = self.individual < self.threshold
        if low_relative and low_individual:
            return "both"
        return "relative" if low_relative else "individual"


def section_seconds(summary: Summary, section: str) -> float | None:
    """A rank's time in ``section`` for a window: its p50 if derived, else its mean."""
    derived = summary.get("derived")
    if isinstance(derived, dict):
        value = _positive(derived.get(f"{section}/p50"))
        if value is not None:
            return value
    metrics = summary.get("metrics")
    if isinstance(metrics, dict):
        stats = metrics.get(section)
        if isinstance(stats, dict):
            return _positive(stats.get("mean"))
    return None


def _positive(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and number > 0:
            return number
    return None


class _RankState:
    __slots__ = ("best", "flagged", "restart", "streak")

    def __init__(self, restart: int) -> None:
        self.restart = restart
        self.best: dict[str, float] = {}
        self.streak = 0
        self.flagged = False


class StragglerDetector:
    """Scores the ranks of each job window and flags stragglers; see the module docstring."""

    def __init__(self, settings: StragglerSettings | None = None) -> None:
        self.settings = settings or StragglerSettings()
        self._ranks: dict[int, _RankState] = {}

    def _scores(self, fastest: float, best: float, seconds: float) -> tuple[float, float]:
        """(relative, individual), each time with the floor added."""
        floor = self.settings.floor_seconds
        return (fastest + floor) / (seconds + floor), (best + floor) / (seconds + floor)

    def flagged(self) -> set[int]:
        """The ranks flagged now (a flag lasts until the rank's scores recover)."""
        return {rank for rank, state in self._ranks.items() if state.flagged}

    def section(self, window: JobWindow) -> tuple[str, dict[int, float]] | None:
        """The first configured section every rank of ``window`` has, with its times."""
        for section in self.settings.sections:
            times: dict[int, float] = {}
            for rank, summary in window.ranks.items():
                value = section_seconds(summary, section)
                if value is None:
                    break
                times[rank] = value
            else:
                if times:
                    return section, times
        return None

    def scores(self, window: JobWindow) -> dict[int, tuple[float, float]]:
        """Each rank's (relative, individual) score for ``window``; changes no state."""
        found = self.section(window)
        if found is None:
            return {}
        section, times = found
        fastest = min(times.values())
        out = {}
        for rank, seconds in times.items():
            best = seconds
            state = self._ranks.get(rank)
            if state is not None and state.restart == window.restart(rank):
                best = min(state.best.get(section, seconds), seconds)
            out[rank] = self._scores(fastest, best, seconds)
        return out

    def judge(self, window: JobWindow) -> list[StragglerFinding]:
        """Score ``window``, advance each rank's streak, and return the new findings."""
        if not self.settings.enabled:
            return []
        found = self.section(window)
        if found is None:
            return []
        section, times = found
        fastest = min(times.values())
        threshold = self.settings.threshold
        findings: list[StragglerFinding] = []
        flagged: list[tuple[int, float, float, float]] = []
        for rank, seconds in times.items():
            restart = window.restart(rank)
            state = self._ranks.get(rank)
            if state is None or state.restart != restart:
                state = self._ranks[rank] = _RankState(restart)
            best = min(state.best.get(section, seconds), seconds)
            state.best[section] = best
            relative, individual = self._scores(fastest, best, seconds)
            behind = relative < (1.0 + threshold) / 2.0
            if relative < threshold or (individual < threshold and behind):
                state.streak += 1
                if state.streak >= self.settings.consecutive and not state.flagged:
                    state.flagged = True
                    flagged.append((rank, seconds, best, relative))
            else:
                state.streak = 0
                state.flagged = False
        if not flagged:
            return []
        backward = {
            rank: value
            for rank, summary in window.ranks.items()
            if (value := section_seconds(summary, BACKWARD)) is not None
        }
        least = min(backward.values()) if backward else None
        step = window.step
        for rank, seconds, best, relative in flagged:
            mine = backward.get(rank)
            findings.append(
                StragglerFinding(
                    rank=rank,
                    host=window.host(rank),
                    local_rank=window.local_rank(rank),
                    run=window.run,
                    index=window.index,
                    step=step,
                    section=section,
                    seconds=seconds,
                    fastest_seconds=fastest,
                    best_seconds=best,
                    relative=relative,
                    individual=self._scores(fastest, best, seconds)[1],
                    threshold=threshold,
                    backward=backward,
                    waits_least=None if mine is None or least is None else mine <= least,
                )
            )
        return findings
