"""What crosses the analysis thread's boundaries, typed.

In: stored batches (``sinks.schema.Batch``) from the receive loop, host
samples from the system sampler, sink alerts, and the close request. Out:
``Derived`` entries for the receive loop to store and send on. Back from the
statistics workers: the results of their jobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sinks.schema import ALERT, Batch

MapMethod = Literal["tsne", "pca"]


@dataclass(frozen=True)
class SystemSample:
    """One host sample (a ``system`` entry), from the sampler's thread."""

    entry: dict[str, Any]


@dataclass(frozen=True)
class SinkAlarm:
    """A sink's or the ingest's own alarm (a failing sink, a series cap, too many metric
    names), for the rules' cooldowns.

    ``run`` None: no particular run (every open run gets it). ``event`` is the
    alert-rule event it feeds; ``entry`` the alert as stored when no rule takes it.
    """

    run: str | None
    event: str
    entry: dict[str, Any]

    @classmethod
    def from_sink(cls, run: str | None, alert: Mapping[str, Any]) -> SinkAlarm:
        """A sink's alert (``sinks.base.SinkAlert``): its ``event`` names the rule event,
        defaulting to its ``name``, and is not stored."""
        entry = {"kind": ALERT, **alert}
        event = str(entry.pop("event", None) or entry.get("name", "sink_failed"))
        return cls(run, event, entry)


@dataclass(frozen=True)
class Close:
    """Finish every run (last windows, final dashboards), then stop."""


InboxItem = Batch | SystemSample | SinkAlarm | Close


@dataclass(frozen=True)
class Derived:
    """Something the analysis made, for the receive loop to store and send on.

    ``run`` None: no particular run (stored in every open one, sent to sinks
    once). ``to_store`` / ``to_sinks`` follow an alert's destinations. A
    ``system`` sample with ``run`` None and ``to_store`` False was taken while
    no run was open: it goes only to the sinks that take samples between runs.
    """

    run: str | None
    entry: dict[str, Any]
    to_store: bool = True
    to_sinks: bool = True


@dataclass(frozen=True)
class FeatureBatch:
    """One stored ``probe.features`` batch: its stream, step and where its rows are."""

    run: str
    rank: int
    name: str
    step: int | None
    run_dir: Path
    line: Mapping[str, Any]


@dataclass(frozen=True)
class FeatureStatistics:
    """Rank/collapse statistics of a batch, or the cosine of a student/teacher pair."""

    batch: FeatureBatch
    metrics: dict[str, float]


@dataclass(frozen=True)
class FeatureMapDrawn:
    """A t-SNE/PCA map of a batch, written to ``path``."""

    batch: FeatureBatch
    method: MapMethod
    path: Path


@dataclass(frozen=True)
class DashboardDrawn:
    """A run's training dashboard at ``step``, written to ``path``."""

    run: str
    step: int | None
    path: Path


@dataclass(frozen=True)
class CheckpointSaved:
    """A ``checkpoint`` event: the file a trainer saved, and the size it saw."""

    run: str
    rank: int
    step: int | None
    path: str
    size: int | None
    best: bool = False  # the best so far by the saver's metric


@dataclass(frozen=True)
class CheckpointChecked:
    """What the check of a saved checkpoint found: its sha256, or the problem.

    ``rotated``: the file was gone, deleted by its saver's rotation before the
    check came to it (no longer in its directory's index.json): not a failure.
    """

    saved: CheckpointSaved
    sha256: str | None
    problem: str | None
    rotated: bool = False


JobResult = FeatureStatistics | FeatureMapDrawn | DashboardDrawn | CheckpointChecked
