"""The watched trainers on this real host: real processes, their workers, the ones that go."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil

from agent.system.errors import SamplerErrors
from agent.system.processes import TrainerProcesses
from tests.agent.system.support import MB, TRAINER, FakeClock, line_of, no_gpus
from tests.helpers import wait_for


def test_trainer_line_sums_its_children(processes: Any, children_walk: str) -> None:
    """A trainer's line sums its workers: RSS >= 260 MB, 2 children, one spinning core of CPU."""
    trainer = processes(TRAINER)
    sampler = no_gpus(pids=lambda: [trainer.pid], children_scan_interval=0)

    def summed() -> dict[str, Any] | None:
        line = line_of(sampler.sample(), trainer.pid)
        assert line is not None, "the trainer is running"
        return line if line["children"] == 2 and line["rss_bytes"] >= 260 * MB else None

    line = wait_for(summed, 30, "the trainer and its two workers at full size")
    assert line["name"].startswith("python")
    assert line["threads"] >= 3

    def busy() -> dict[str, Any] | None:
        time.sleep(0.2)  # the interval the CPU share is measured over
        line = line_of(sampler.sample(), trainer.pid)
        assert line is not None
        return line if line.get("cpu_percent", 0) >= 30 else None

    line = wait_for(busy, 30, "the spinning worker's CPU in its trainer's line")
    assert line["cpu_percent"] <= 100 * psutil.cpu_count() + 10


def test_children_are_found_by_the_periodic_scan(
    processes: Any, tmp_path: Path, children_walk: str
) -> None:
    """A worker started after a scan joins its trainer's line at the next scan, not before."""
    go = tmp_path / "go"
    trainer = processes(
        "import os, subprocess, sys, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "time.sleep(600)"
    )
    clock = FakeClock()
    sampler = no_gpus(pids=lambda: [trainer.pid], clock=clock, children_scan_interval=5.0)
    assert line_of(sampler.sample(), trainer.pid)["children"] == 0  # type: ignore[index]
    go.touch()
    wait_for(lambda: psutil.Process(trainer.pid).children(), 30, "the trainer's worker")
    clock.now += 4.0
    assert line_of(sampler.sample(), trainer.pid)["children"] == 0  # type: ignore[index]
    clock.now += 1.0
    assert line_of(sampler.sample(), trainer.pid)["children"] == 1  # type: ignore[index]


def test_grandchildren_and_children_of_other_threads_are_found(
    processes: Any, children_walk: str
) -> None:
    """A worker forked by a non-main thread, and that worker's own child, are the trainer's."""
    trainer = processes(
        "import subprocess, sys, threading, time\n"
        "grandchild = 'import subprocess, sys, time; "
        'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]); '
        "time.sleep(600)'\n"
        "def fork():\n"
        "    subprocess.Popen([sys.executable, '-c', grandchild])\n"
        "    time.sleep(600)  # alive: the worker stays this thread's child\n"
        "threading.Thread(target=fork, daemon=True).start()\n"
        "time.sleep(600)"
    )
    sampler = no_gpus(pids=lambda: [trainer.pid], children_scan_interval=0)
    wait_for(
        lambda: len(psutil.Process(trainer.pid).children(recursive=True)) == 2,
        30,
        "the worker and its child",
    )
    expected = {p.pid for p in psutil.Process(trainer.pid).children(recursive=True)}
    trainers = TrainerProcesses(lambda: [trainer.pid], SamplerErrors())
    found = {p.pid for p in trainers.scan([psutil.Process(trainer.pid)])[trainer.pid]}
    assert found == expected
    assert line_of(sampler.sample(), trainer.pid)["children"] == 2  # type: ignore[index]


def test_gone_trainer_is_reported_once_and_dropped(processes: Any) -> None:
    """A trainer that exits is listed under `gone` in one sample only; a pid never seen too."""
    trainer = processes("import time; time.sleep(600)")
    missing = 2**22 + 12345  # above Linux's default pid_max: no such process
    sampler = no_gpus(pids=lambda: [trainer.pid, missing])
    first = sampler.sample()
    assert line_of(first, trainer.pid) is not None
    assert first["gone"] == [missing]
    os.killpg(trainer.pid, signal.SIGKILL)
    trainer.wait(10)
    second = sampler.sample()
    assert second["gone"] == [trainer.pid]
    assert second["processes"] == []
    third = sampler.sample()
    assert "gone" not in third and third["processes"] == []


def test_zombie_trainer_counts_as_gone(processes: Any) -> None:
    """A trainer that exited but is not reaped yet (a zombie) is gone, not a 0-byte line."""
    trainer = processes("import time; time.sleep(600)")
    sampler = no_gpus(pids=lambda: [trainer.pid])
    assert line_of(sampler.sample(), trainer.pid) is not None
    os.kill(trainer.pid, signal.SIGKILL)  # no wait(): it stays a zombie
    wait_for(lambda: psutil.Process(trainer.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
    assert sampler.sample()["gone"] == [trainer.pid]
    assert "gone" not in sampler.sample()


def test_failing_pids_callable_is_counted_not_raised() -> None:
    """pids() raising gives a sample with no process lines and a counted error."""

    def broken() -> list[int]:
        raise RuntimeError("agent bug")

    sampler = no_gpus(pids=broken)
    entry = sampler.sample()
    assert entry["processes"] == []
    assert sampler.counters()["process_errors"] == 1
