"""The sampler's thread and lifecycle: the schedule, a failing emit, a bounded close."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from agent.system.sampler import SystemSampler
from tests.agent.system.support import LOGGER, no_gpus
from tests.helpers import wait_for


def test_bad_interval_is_refused() -> None:
    """A zero, negative or NaN interval is a ValueError that names the parameter."""
    for interval in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="interval"):
            no_gpus(interval=interval)


# -- the thread -----------------------------------------------------------------------------


def test_thread_emits_at_the_interval_and_close_joins() -> None:
    """start() emits at once and then every interval, never in bursts; close() joins in time."""
    emitted: list[float] = []
    sampler = SystemSampler(
        lambda entry: emitted.append(time.monotonic()), interval=0.05, nvml=None
    )
    started = time.monotonic()
    sampler.start()
    wait_for(lambda: len(emitted) >= 5, 10, "five samples")
    before = time.monotonic()
    assert sampler.close(2.0) is True
    assert time.monotonic() - before < 2.0
    elapsed = emitted[-1] - started
    assert len(emitted) <= elapsed / 0.05 + 2  # no more than the schedule allows
    assert not any(t.name == "outrider-system-sampler" for t in threading.enumerate())
    count = len(emitted)
    time.sleep(0.15)  # three intervals: a stopped sampler emits nothing more
    assert len(emitted) == count
    with pytest.raises(RuntimeError, match="close"):
        sampler.start()


def test_raising_emit_does_not_stop_the_sampler(caplog: pytest.LogCaptureFixture) -> None:
    """emit raising every time: sampling goes on, errors are counted and logged once a minute."""

    def emit(entry: dict[str, Any]) -> None:
        raise RuntimeError("sink queue exploded")

    sampler = SystemSampler(emit, interval=0.02, nvml=None)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sampler.start()
        wait_for(lambda: sampler.counters()["emit_errors"] >= 5, 10, "five failed emits")
        assert sampler.close(2.0)
    counters = sampler.counters()
    assert counters["samples"] >= 5 and counters["sample_errors"] == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sink queue exploded" in warnings[0].getMessage()
    assert warnings[0].name == LOGGER and warnings[0].getMessage().endswith("(1 so far)")


def test_close_is_bounded_when_emit_hangs() -> None:
    """An emit that blocks: close(timeout) returns False after about timeout, not forever."""
    release = threading.Event()
    entered = threading.Event()

    def emit(entry: dict[str, Any]) -> None:
        entered.set()
        release.wait(30)

    sampler = SystemSampler(emit, interval=0.02, nvml=None)
    sampler.start()
    assert entered.wait(10)
    before = time.monotonic()
    assert sampler.close(0.2) is False
    assert time.monotonic() - before < 2.0
    release.set()
    thread = next(t for t in threading.enumerate() if t.name == "outrider-system-sampler")
    thread.join(10)
    assert not thread.is_alive()
