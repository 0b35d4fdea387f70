"""The job's figures of a window: the extreme ranks of each metric, and the ``job/...`` scalars.

A job view with 8,000 ranks cannot plot 8,000 lines per metric; what people act on is the
spread and who sits at its ends: the slowest rank's median step time, the rank with the
highest loss. Per job window and metric, over the ranks' window means (the summaries'
``metrics``) and their derived figures (``step_time_seconds/p50``, ...):

- :func:`extremes` gives, per metric, the lowest and highest value with the rank and host
  holding each, the spread (max - min), the mean over ranks and how many ranks had it;
- :func:`job_scalars` gives the flat scalars the aggregator exports: ``job/<metric>/mean``,
  ``/min``, ``/max`` and ``/spread`` for each metric (so ``job/step_time_seconds/p50/max``
  is the slowest rank's median step time), ``job/ranks_reporting``, ``job/ranks_missing``,
  and from the straggler scores ``job/stragglers`` (ranks below the threshold now),
  ``job/straggler_score/relative_min`` and ``job/straggler_score/individual_min``.

Only the first ``max_metrics`` names (sorted) of the union over ranks are considered, so
the cost stays ``ranks x max_metrics`` dictionary reads plus one numpy pass per metric.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from agent.aggregation.windows import JobWindow

MAX_METRICS = 128


@dataclass
class Extreme:
    """One metric of a job window over its ranks."""

    metric: str
    min: float
    min_rank: int
    min_host: str | None
    max: float
    max_rank: int
    max_host: str | None
    spread: float
    mean: float
    ranks: int  # ranks with a finite value


def _number(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def rank_values(window: JobWindow, names: list[str]) -> tuple[list[int], Any]:
    """The window's ranks, and a (ranks x names) array of their window means (NaN: none).

    A name in a summary's ``metrics`` gives its mean; else one in its ``derived`` its value.
    One pass over each summary's dictionaries, cheaper than a lookup per (rank, name).
    """
    ranks = list(window.ranks)
    column = {name: j for j, name in enumerate(names)}
    width = len(names)
    rows = []
    for rank in ranks:
        row = [math.nan] * width  # a list per rank, one array at the end: no numpy per value
        summary = window.ranks[rank]
        derived = summary.get("derived")
        if isinstance(derived, dict):
            for name, value in derived.items():
                j = column.get(name)
                if j is not None:
                    row[j] = _number(value)
        metrics = summary.get("metrics")
        if isinstance(metrics, dict):
            for name, stats in metrics.items():
                j = column.get(name)
                if j is not None and isinstance(stats, dict):
                    row[j] = _number(stats.get("mean"))
        rows.append(row)
    values = np.array(rows, dtype=np.float64).reshape(len(ranks), width)
    return ranks, values


def metric_names(window: JobWindow, max_metrics: int = MAX_METRICS) -> list[str]:
    """The first ``max_metrics`` names (sorted) of the window's metrics and derived figures."""
    names: set[str] = set()
    for summary in window.ranks.values():
        for part in ("metrics", "derived"):
            held = summary.get(part)
            if isinstance(held, dict):
                names.update(held)
    return sorted(names)[:max_metrics]


def extremes(window: JobWindow, max_metrics: int = MAX_METRICS) -> dict[str, Extreme]:
    """Per metric: its lowest and highest rank value, and who holds them (module docstring)."""
    names = metric_names(window, max_metrics)
    ranks, table = rank_values(window, names)
    out: dict[str, Extreme] = {}
    if not ranks:
        return out
    for j, name in enumerate(names):
        values = table[:, j]
        finite = np.isfinite(values)
        count = int(finite.sum())
        if count == 0:
            continue
        masked_low = np.where(finite, values, np.inf)
        masked_high = np.where(finite, values, -np.inf)
        low, high = int(np.argmin(masked_low)), int(np.argmax(masked_high))
        out[name] = Extreme(
            metric=name,
            min=float(values[low]),
            min_rank=ranks[low],
            min_host=window.host(ranks[low]),
            max=float(values[high]),
            max_rank=ranks[high],
            max_host=window.host(ranks[high]),
            spread=float(values[high] - values[low]),
            mean=float(values[finite].mean()),
            ranks=count,
        )
    return out


def job_scalars(
    window: JobWindow,
    scores: dict[int, tuple[float, float]] | None = None,
    *,
    threshold: float = 0.75,
    found: dict[str, Extreme] | None = None,
    max_metrics: int = MAX_METRICS,
) -> dict[str, float]:
    """The ``job/...`` scalars of ``window`` (module docstring); ``scores`` are the straggler
    detector's, ``found`` the window's :func:`extremes` when the caller has them already."""
    if found is None:
        found = extremes(window, max_metrics)
    out: dict[str, float] = {
        "job/ranks_reporting": float(len(window.ranks)),
        "job/ranks_missing": float(len(window.missing)),
    }
    for name, extreme in found.items():
        out[f"job/{name}/mean"] = extreme.mean
        out[f"job/{name}/min"] = extreme.min
        out[f"job/{name}/max"] = extreme.max
        out[f"job/{name}/spread"] = extreme.spread
    if scores:
        relative = min(score[0] for score in scores.values())
        individual = min(score[1] for score in scores.values())
        out["job/stragglers"] = float(
            sum(1 for r, i in scores.values() if r < threshold or i < threshold)
        )
        out["job/straggler_score/relative_min"] = relative
        out["job/straggler_score/individual_min"] = individual
    return out
