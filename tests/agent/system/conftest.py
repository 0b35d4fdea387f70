"""Fixtures of the system room: real trainer processes, and both ways of finding their workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator

import pytest

from agent.system import processes as trainer_processes
from tests.agent.system.support import spawn


@pytest.fixture
def processes() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start Python processes (each in its own process group); all are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> subprocess.Popen[bytes]:
        process = spawn(code)
        started.append(process)
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


@pytest.fixture(params=["proc-children", "process-table"])
def children_walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each way of finding a trainer's descendants."""
    if request.param == "proc-children":
        if not trainer_processes.PROC_CHILDREN:
            pytest.skip("this kernel has no /proc/<pid>/task/<tid>/children")
    else:
        monkeypatch.setattr(trainer_processes, "PROC_CHILDREN", False)
    return str(request.param)
