"""Internal-error policy: the probe never raises into the trainer.

Every internal failure is counted (the count travels to the agent in
probe_stats) and logged once per error type. Tests set ``RAISE`` so that a
swallowed bug still fails the suite loudly.
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("outrider.probe")

# Set by the test suite (tests/conftest.py, or OUTRIDER_PROBE_RAISE=1 in a trainer
# subprocess): re-raise instead of swallowing, so hidden bugs fail loudly.
RAISE = os.environ.get("OUTRIDER_PROBE_RAISE") == "1"

_lock = threading.Lock()
_count = 0
_seen: set[str] = set()


def record(exc: BaseException, where: str) -> None:
    """Count an internal error and log the first of each kind; re-raise under test."""
    global _count
    with _lock:
        _count += 1
        key = f"{where}:{type(exc).__name__}"
        first = key not in _seen
        _seen.add(key)
    if first:
        logger.warning(
            "outrider probe: internal error in %s (%s: %s); the trainer continues, "
            "telemetry from this call is lost and counted",
            where,
            type(exc).__name__,
            exc,
        )
    if RAISE:
        raise exc


def error_count() -> int:
    """How many internal errors the probe has swallowed in this process."""
    return _count


def warn_once(key: str, message: str, *args: object) -> None:
    """Log a user-facing warning the first time ``key`` is seen in this process."""
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    logger.warning(message, *args)


def reset_after_fork() -> None:
    """A forked child starts with its own counters and its own warnings."""
    global _lock, _count
    _lock = threading.Lock()
    _count = 0
    _seen.clear()
