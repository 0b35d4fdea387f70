"""The sink contract: what every destination (TensorBoard, Prometheus, W&B, ...) implements.

Deliberately small, after OpenTelemetry's exporters: ``export`` a batch,
``flush`` with a timeout, ``close``. Queueing, retries with backoff, drop
counting and health live once, in ``sinks/worker.py``, not in each sink.

What a sink receives is exactly what the run store writes: each entry is a
``metrics.jsonl`` line (``sinks/schema.py``, docs/protocol.md), grouped by the
stream it came from. A sink must treat entries as read-only: every sink sees the same ones.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, NotRequired, TypedDict

from sinks.schema import Batch, Source

__all__ = ["Batch", "Sink", "SinkAlert", "Source", "plain_numbers"]

_PLAIN_NUMBER_TYPES = frozenset((float, int))


def plain_numbers(values: Iterable[Any]) -> bool:
    """Whether every value is a float or an int (not a bool, not a non-finite spelling).

    What the run store writes almost always is: a sink checks that in C and takes
    the values as they are, and checks value by value only when it fails.
    """
    return _PLAIN_NUMBER_TYPES.issuperset(map(type, values))


class SinkAlert(TypedDict):
    """An alert a sink raises about itself (a series cap reached, say)."""

    name: str
    severity: str  # info, warning, error or critical
    message: str
    event: NotRequired[str]  # the alert-rule event it feeds; absent: its name
    run: NotRequired[str]  # the run it concerns; absent: every open run
    attrs: NotRequired[dict[str, Any]]


class Sink(abc.ABC):
    """A destination for accepted records.

    ``prepare``, ``export``, ``flush`` and ``close`` run on the sink's own
    worker thread, one at a time; ``counters`` and ``take_alerts`` run on the
    agent's threads while an export may be under way, so they must be cheap
    and safe to call concurrently with it.
    """

    #: the name used in the agent's config file (``sinks: {name: {...}}``)
    name: ClassVar[str]

    #: seconds one call may legitimately take before the worker reports the sink
    #: ``stalled``; the worker's own limit (30 s) applies when it is longer. A sink
    #: whose limit depends on its options sets it per instance.
    stall_after: float = 0.0

    #: whether the sink also takes the agent's host samples while no run is open: batches
    #: of ``system`` entries whose source run is "" and run_dir "" (nothing is stored for
    #: them). For sinks that show a host's current state, as a DCGM exporter does.
    between_runs: ClassVar[bool] = False

    @abc.abstractmethod
    def export(self, batches: Sequence[Batch]) -> None:
        """Deliver ``batches``; raise to signal failure (the worker retries with backoff).

        A retry hands over the same batches again, so delivery is at least
        once: a sink that wrote part of them before failing sees that part twice.
        """

    def prepare(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Pay one-off costs (heavy imports) once, on the sink's thread, before any export.

        The agent starts before the trainer, so what is paid here is not taken
        from training steps; a failure is logged and left to the first export.
        """

    def flush(self, timeout: float) -> None:  # noqa: B027 - optional hook, no-op by default
        """Make what was exported visible (write files, push buffers) within ``timeout``.

        Called about once per flush interval, and once more before ``close``.
        """

    def close(self, timeout: float) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release resources; called once, after the last export and flush."""

    def counters(self) -> dict[str, int]:
        """The sink's own counters (e.g. entries it skipped), shown with its health."""
        return {}

    def take_alerts(self) -> list[SinkAlert]:
        """Alerts the sink raised since the last call (each handed over once).

        Called on the agent's receive loop once a second; the agent stores
        each as an ``alert`` entry and routes it like its own alerts.
        """
        return []
