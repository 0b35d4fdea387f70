"""An in-memory sink: keeps every batch it is given, for tests and for embedding the agent."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pydantic

from sinks.base import Batch, Sink
from sinks.registry import SinkContext


class MemorySink(Sink):
    name = "memory"

    class Options(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        max_batches: int = pydantic.Field(default=100_000, gt=0)

    def __init__(self, options: Options | None = None, context: SinkContext | None = None) -> None:
        self.options = options or self.Options()
        self.batches: list[Batch] = []
        self.flushes = 0
        self.closed = False
        self._lock = threading.Lock()

    def export(self, batches: Sequence[Batch]) -> None:
        with self._lock:
            self.batches.extend(batches)
            del self.batches[: -self.options.max_batches]

    def flush(self, timeout: float) -> None:
        self.flushes += 1

    def close(self, timeout: float) -> None:
        self.closed = True

    def entries(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every entry received so far, optionally of one kind."""
        with self._lock:
            return [e for b in self.batches for e in b.entries if kind is None or e["kind"] == kind]
