"""The sampler's failures: every one counted, each kind logged at most once per interval."""

from __future__ import annotations

import logging

import pytest

from agent.system.errors import SamplerErrors
from tests.agent.system.support import LOGGER, FakeClock


def test_each_kind_logs_once_per_interval_with_its_running_total(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Failures within the interval are counted, not logged; the next line says the total."""
    clock = FakeClock()
    errors = SamplerErrors(interval=60.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for _ in range(3):
            errors.count("nvml_errors", "GPU %d: %s", 0, "GPU is lost")
        errors.count("emit_errors", "emit raised %r", ValueError("full"))
        clock.now += 59.0
        errors.count("nvml_errors", "GPU %d: %s", 0, "GPU is lost")
        clock.now += 1.0
        errors.count("nvml_errors", "GPU %d: %s", 1, "GPU is lost")
    assert errors.counts == {
        "sample_errors": 0,
        "emit_errors": 1,
        "nvml_errors": 5,
        "process_errors": 0,
    }
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (LOGGER, logging.WARNING, "outrider system sampler: GPU 0: GPU is lost (1 so far)"),
        (
            LOGGER,
            logging.WARNING,
            "outrider system sampler: emit raised ValueError('full') (1 so far)",
        ),
        (
            LOGGER,
            logging.WARNING,
            "outrider system sampler: GPU 1: GPU is lost (5 so far) (3 similar suppressed)",
        ),
    ]
