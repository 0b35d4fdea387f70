"""A rate-limited complaint log, for the agent and its sinks (they run in its process).

Bad input must never flood the log: each key (a rejection reason, a failing
sink, a sampler error, a skipped entry) logs at most once per interval, with
the number suppressed since the last line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

#: where a complaint goes unless the caller names its own logger
AGENT_LOG = logging.getLogger("outrider.agent")


class RateLimitedLog:
    """At most one line per key per ``interval`` seconds, counting the rest."""

    def __init__(
        self,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        log: logging.Logger = AGENT_LOG,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.log = log
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
        self.log.warning(message, *args)
        return True
