"""A per-run cap on the metric names the agent tracks in memory.

Each name a run logs costs memory for as long as the run lasts, in everything
that tracks it: the statistics and alert rules, each sink's series, tags and
writers. A name made from a step, a sample id or a token (``loss/sample_81723``)
turns that into a leak. So the run store keeps every value (disk is the source
of truth), and the first ``limit`` distinct names of a run are the ones the
analysis and the sinks see: values under later names are held back from them,
counted, and the run gets one ``too_many_metrics`` alert.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.analysis.messages import SinkAlarm
from agent.ingest.counters import AgentCounters
from probe import protocol
from sinks.schema import ALERT

if TYPE_CHECKING:
    from agent.store.run_store import RunStore

DEFAULT_LIMIT = 10_000
EVENT = "too_many_metrics"  # the alert rule event (agent/alerts/defaults.yaml)
RUN_JSON_KEY = "metric_names"


@dataclass(slots=True)
class _RunNames:
    """The names one run's analysis and sinks track, and what was held back from them."""

    names: set[str] = field(default_factory=set)
    values_over_cap: int = 0

    def figures(self, limit: int) -> dict[str, int]:
        return {
            "tracked": len(self.names),
            "limit": limit,
            "values_over_cap": self.values_over_cap,
        }


class MetricNameCap:
    """Tracks each run's first ``limit`` metric names; holds back values of the others.

    Used on the receive loop's thread only. ``counters.metric_values_over_cap`` is the
    agent-wide total; each run's figures go to its run.json under ``metric_names`` once
    its cap is reached.
    """

    def __init__(self, limit: int = DEFAULT_LIMIT, counters: AgentCounters | None = None) -> None:
        if limit < 1:
            raise ValueError(f"MetricNameCap(limit={limit}): must be at least 1")
        self.limit = limit
        self.counters = counters if counters is not None else AgentCounters()
        self._runs: dict[str, _RunNames] = {}
        self._alarms: list[SinkAlarm] = []

    def admit(self, store: RunStore, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The stored entries as the analysis and the sinks get them: scalars lines keep
        only the run's tracked names. Entries with nothing held back are passed as they are."""
        run = self._runs.get(store.run_id)
        if run is None:
            run = self._runs[store.run_id] = _RunNames()
        names = run.names
        out = entries
        for index, entry in enumerate(entries):
            if entry.get("kind") != protocol.SCALARS:
                continue
            metrics = entry.get("metrics")
            if type(metrics) is not dict or names.issuperset(metrics):
                continue  # the common case: every name already tracked
            room = self.limit - len(names)
            fresh = [name for name in metrics if name not in names]
            names.update(fresh[:room] if room > 0 else ())
            if room >= len(fresh):
                continue
            kept = {name: value for name, value in metrics.items() if name in names}
            held = len(metrics) - len(kept)
            if out is entries:
                out = list(entries)  # the stored lines stay as they were written
            out[index] = {**entry, "metrics": kept}
            self._hold_back(store, run, held)
        return out

    def _hold_back(self, store: RunStore, run: _RunNames, held: int) -> None:
        first = run.values_over_cap == 0
        run.values_over_cap += held
        self.counters.metric_values_over_cap += held
        store.info[RUN_JSON_KEY] = run.figures(self.limit)
        if first:
            self._alarms.append(self._alarm(store.run_id))

    def _alarm(self, run_id: str) -> SinkAlarm:
        message = (
            f"run {run_id} logged more than {self.limit} distinct metric names: values of the "
            "others are stored in metrics.jsonl but not tracked by the statistics, alerts and "
            "sinks. Log fewer distinct names (no step, sample or token ids in names), or raise "
            "the agent's max_metric_names."
        )
        entry = {
            "kind": ALERT,
            "name": EVENT,
            "severity": "warning",
            "message": message,
            "attrs": {"limit": self.limit},
        }
        return SinkAlarm(run_id, EVENT, entry)

    def take_alarms(self) -> list[SinkAlarm]:
        """One ``too_many_metrics`` alarm per run whose cap was reached since the last call."""
        alarms, self._alarms = self._alarms, []
        return alarms

    def figures(self, run_id: str) -> dict[str, int] | None:
        """A run's figures (None: nothing logged yet)."""
        run = self._runs.get(run_id)
        return None if run is None else run.figures(self.limit)
