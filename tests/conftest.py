"""Shared fixtures: a real agent process per test, and loud probe errors."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import probe
from probe import internal
from tests.helpers import TEST_CONFIG, short_ipc_endpoint, start_agent, stop_agent

# Agents started by tests serve no dashboard: hundreds of them would contend for port 8080.
# The dashboard's own tests turn it on, each on a port of its own.
os.environ["OUTRIDER_DASHBOARD"] = "off"
# ... and draw no dashboard images (tests/agent_config.yaml), unless a test passes --config.
os.environ["OUTRIDER_CONFIG"] = str(TEST_CONFIG)
# Probes send on their flush_interval whatever the machine's load: tests run beside each
# other on busy cores, and their messages must not depend on it. The tests of the longer
# window on busy cores pass busy_flush_interval themselves.
os.environ["OUTRIDER_BUSY_FLUSH_INTERVAL"] = "0"

pytest_plugins = ["tests.small_disk"]  # the small_disk fixture (a 1 MiB filesystem)

# Property tests are the same every run (derandomized, no example database), so CI is
# repeatable and fast; HYPOTHESIS_PROFILE=explore searches further, with fresh examples.
settings.register_profile(
    "ci",
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("explore", deadline=None, max_examples=5_000, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def probe_errors_raise() -> Iterator[None]:
    """A bug the probe would swallow in production fails the test instead."""
    internal.RAISE = True
    yield
    internal.RAISE = False
    probe._reset_for_tests()


@pytest.fixture
def endpoint() -> Iterator[str]:
    ep = short_ipc_endpoint()
    yield ep
    shutil.rmtree(Path(ep.removeprefix("ipc://")).parent, ignore_errors=True)


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs"


@pytest.fixture
def agent_options() -> tuple[str, ...]:
    """Extra `outrider agent` options for the ``agent`` fixture; a test module overrides it."""
    return ()


@pytest.fixture
def agent(endpoint: str, runs_dir: Path, agent_options: tuple[str, ...]) -> Iterator[object]:
    """A real agent process bound to ``endpoint``, storing in ``runs_dir``."""
    process = start_agent(endpoint, runs_dir, *agent_options)
    yield process
    if process.poll() is None:
        stop_agent(process)
