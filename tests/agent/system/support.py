"""What the system room's tests share: a settable clock, trainer processes, sample lookups."""

from __future__ import annotations

import subprocess
from typing import Any

from agent.system.sampler import SystemSampler
from tests.helpers import PYTHON, wait_for

MB = 1 << 20
LOGGER = "outrider.agent.system"

# A trainer: holds 200 MB, starts two workers (30 MB each), one of which spins a core.
TRAINER = """
import subprocess, sys, time
held = b"x" * (200 << 20)
worker = "held = b'y' * (30 << 20)\\nimport time\\nwhile {spin}: pass\\ntime.sleep(600)"
children = [
    subprocess.Popen([sys.executable, "-c", worker.format(spin=spin)]) for spin in (True, False)
]
time.sleep(600)
"""


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def spawn(code: str) -> subprocess.Popen[bytes]:
    """A Python process running ``code`` in its own process group."""
    return subprocess.Popen([PYTHON, "-c", code], start_new_session=True)


def line_of(entry: dict[str, Any], pid: int) -> dict[str, Any] | None:
    """The process line of ``pid`` in a sample, if any."""
    return next((p for p in entry["processes"] if p["pid"] == pid), None)


def with_rates(sampler: SystemSampler, clock: FakeClock) -> dict[str, Any]:
    """The next sample whose host CPU counters moved (so it has cpu_percent), 1 s of clock apart."""

    def attempt() -> dict[str, Any] | None:
        clock.now += 1.0
        entry = sampler.sample()
        return entry if "cpu_percent" in entry else None

    result: dict[str, Any] = wait_for(attempt, 10, "a sample with host CPU %")
    return result


def no_gpus(**kwargs: Any) -> SystemSampler:
    """A sampler that never touches NVML (the GPU path has its own tests)."""
    return SystemSampler(lambda entry: None, nvml=None, **kwargs)
