"""Rank divergence: a rank whose loss or gradient norm departs from the other ranks'.

Data-parallel ranks train the same weights on different batches, so their window means
of ``loss`` stay close, and after the gradient all-reduce their ``grad_norm`` is the same.
A rank that departs has bad data (a corrupt shard, a wrong tokenizer), a desynchronised
replica, or a failing device. For each metric of ``metrics``, per job window:

- **score** of a rank = ``|x - m| / (1.4826 * MAD + relative_floor * |m| + 1e-12)``, with
  ``x`` its window mean, ``m`` the median of the other ranks' means and MAD their median
  absolute deviation (about the median of all ranks: one rank moves it by at most half a
  gap). 1.4826 * MAD estimates a standard deviation that one wild rank cannot inflate;
  ``relative_floor`` keeps ranks that agree almost exactly (``grad_norm`` under DDP) from
  scoring huge on rounding noise;
- a rank is flagged when its score is above ``threshold`` for ``consecutive`` windows in a
  row, and at once when its window had non-finite values of the metric while no other
  rank's did. One finding per episode; a window back under the threshold ends it.

The score needs at least ``min_ranks`` (3) ranks with the metric: with two ranks that
differ, nothing says which one departed, so two-rank jobs get only the non-finite check.
With 3 or 4 ranks the others' spread comes from 2 or 3 values and is often small by
chance; the relative floor (1% of the median by default) is what keeps such jobs quiet.
Everything is vectorised with numpy: a sort per metric and window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.aggregation.config import DivergenceSettings
from agent.aggregation.windows import JobWindow

MAD_TO_STD = 1.4826
TINY = 1e-12


@dataclass
class DivergenceFinding:
    """Rank ``rank``'s ``metric`` departed from the other ranks' in window ``index``."""

    rank: int
    host: str | None
    local_rank: int | None
    run: str | None
    index: int
    step: int | None
    metric: str
    value: float  # the rank's window mean (NaN when the window had only non-finite values)
    median: float  # the median of the other ranks' window means
    score: float  # inf for a non-finite rank
    threshold: float
    nonfinite: bool  # flagged for non-finite values, not for the score


def loo_medians(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """For each element, the median of all the others (leave-one-out), in O(n log n)."""
    n = len(values)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    position = np.empty(n, dtype=np.intp)
    position[order] = np.arange(n)
    # The others, sorted, are ``ordered`` without ``position``: index j of them is
    # ordered[j] below the removed one and ordered[j + 1] from it on.
    low, high = (n - 2) // 2, (n - 1) // 2
    at_low = ordered[low + (position <= low)]
    at_high = ordered[high + (position <= high)]
    result: npt.NDArray[np.float64] = (at_low + at_high) / 2
    return result


def robust_scores(values: npt.NDArray[np.float64], relative_floor: float) -> tuple[Any, Any]:
    """Each value's score against the others, and the others' medians (module docstring)."""
    medians = loo_medians(values)
    deviations = np.abs(values - np.median(values))
    spread = MAD_TO_STD * loo_medians(deviations)
    scores = np.abs(values - medians) / (spread + relative_floor * np.abs(medians) + TINY)
    return scores, medians


class _Streak:
    __slots__ = ("count", "flagged", "nonfinite")

    def __init__(self) -> None:
        self.count = 0
        self.flagged = False
        self.nonfinite = False


class DivergenceDetector:
    """Flags ranks whose metrics depart from the other ranks'; see the module docstring."""

    def __init__(self, settings: DivergenceSettings | None = None) -> None:
        self.settings = settings or DivergenceSettings()
        self._streaks: dict[tuple[int, str], _Streak] = {}

    def judge(self, window: JobWindow) -> list[DivergenceFinding]:
        """Score ``window``'s ranks for each configured metric; return the new findings."""
        if not self.settings.enabled:
            return []
        findings: list[DivergenceFinding] = []
        for metric in self.settings.metrics:
            findings.extend(self._judge_metric(window, metric))
        return findings

    def _judge_metric(self, window: JobWindow, metric: str) -> list[DivergenceFinding]:
        ranks: list[int] = []
        means: list[float] = []
        bad: list[int] = []  # ranks with non-finite values of the metric in this window
        for rank, summary in window.ranks.items():
            metrics = summary.get("metrics")
            stats = metrics.get(metric) if isinstance(metrics, dict) else None
            if not isinstance(stats, dict):
                continue
            nonfinite = stats.get("nonfinite")
            if isinstance(nonfinite, int) and nonfinite > 0:
                bad.append(rank)
            mean = stats.get("mean")
            ranks.append(rank)
            means.append(float(mean) if isinstance(mean, (int, float)) else math.nan)
        if len(ranks) < 2:
            return []
        values = np.asarray(means, dtype=np.float64)
        out: list[DivergenceFinding] = []
        threshold = self.settings.threshold
        # Non-finite: a rank alone in having NaN/inf values while the others have none.
        lone = set(bad) if 0 < len(bad) < len(ranks) else set()
        for position, rank in enumerate(ranks):
            streak = self._streak(rank, metric)
            if rank in lone:
                if not streak.nonfinite:
                    streak.nonfinite = True
                    others = np.delete(values, position)
                    others = others[np.isfinite(others)]
                    median = float(np.median(others)) if len(others) else math.nan
                    out.append(
                        self._finding(window, rank, metric, values[position], median, math.inf)
                    )
                    out[-1].nonfinite = True
            else:
                streak.nonfinite = False
        finite = np.isfinite(values)
        if int(finite.sum()) < self.settings.min_ranks:
            return out
        kept = [rank for rank, ok in zip(ranks, finite, strict=True) if ok]
        scores, medians = robust_scores(values[finite], self.settings.relative_floor)
        for rank, value, score, median in zip(kept, values[finite], scores, medians, strict=True):
            streak = self._streak(rank, metric)
            if score > threshold:
                streak.count += 1
                if streak.count >= self.settings.consecutive and not streak.flagged:
                    streak.flagged = True
                    out.append(
                        self._finding(window, rank, metric, value, float(median), float(score))
                    )
            else:
                streak.count = 0
                streak.flagged = False
        return out

    def _streak(self, rank: int, metric: str) -> _Streak:
        streak = self._streaks.get((rank, metric))
        if streak is None:
            streak = self._streaks[(rank, metric)] = _Streak()
        return streak

    def _finding(
        self, window: JobWindow, rank: int, metric: str, value: Any, median: float, score: float
    ) -> DivergenceFinding:
        return DivergenceFinding(
            rank=rank,
            host=window.host(rank),
            local_rank=window.local_rank(rank),
            run=window.run,
            index=window.index,
            step=window.step,
            metric=metric,
            value=float(value),
            median=median,
            score=score,
            threshold=self.settings.threshold,
            nonfinite=False,
        )
