"""The sampler's logger, and its failures: every one counted, few logged.

A sampler that fails every second (a lost GPU, an ``emit`` whose sink is
gone) must not write a warning every second, so each kind of failure logs
at most once per interval, with the running total in the line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sinks.ratelimit import RateLimitedLog

logger = logging.getLogger("outrider.agent.system")

#: the same kind of failure is logged at most this often; every one is counted
ERROR_LOG_INTERVAL_SECONDS = 60.0
#: what ``SystemSampler.counters()`` reports besides ``samples``
ERROR_KINDS = ("sample_errors", "emit_errors", "nvml_errors", "process_errors")


class SamplerErrors:
    """Failures counted by kind; each kind logs at most one warning per ``interval``."""

    def __init__(
        self,
        interval: float = ERROR_LOG_INTERVAL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts = dict.fromkeys(ERROR_KINDS, 0)
        self._log = RateLimitedLog(interval, clock, logger)

    def count(self, kind: str, message: str, *args: object) -> None:
        """Count one failure of ``kind``; log it unless that kind logged recently."""
        self.counts[kind] += 1
        text = "outrider system sampler: " + message + " (%d so far)"
        self._log.warning(kind, text, *args, self.counts[kind])
