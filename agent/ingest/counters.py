"""The agent's own health counters and its rate-limited complaint log.

Bad input must never flood the log (rule 4): each rejection reason logs at
most once per interval, with the number suppressed since the last line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("outrider.agent")


@dataclass
class AgentCounters:
    messages: int = 0
    records: int = 0
    bytes: int = 0
    rejected_messages: dict[str, int] = field(default_factory=dict)
    rejected_records: dict[str, int] = field(default_factory=dict)

    def reject(self, table: dict[str, int], reason: str, count: int = 1) -> None:
        table[reason] = table.get(reason, 0) + count

    def as_dict(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "records": self.records,
            "bytes": self.bytes,
            "rejected_messages": dict(self.rejected_messages),
            "rejected_records": dict(self.rejected_records),
        }


class RateLimitedLog:
    """At most one line per key per ``interval`` seconds, counting the rest."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> bool:
        """Log unless ``key`` logged recently; True when a line was written."""
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" ({suppressed} similar suppressed)"
        logger.warning(message, *args)
        return True
