"""The watched trainer processes, each summed with its descendants (DataLoader and compile workers).

Finding the descendants is the costly part, so it runs every
``children_scan_interval`` seconds (and at once for a new trainer), not every
sample; between scans the known ones are measured. Linux lists each thread's
children in ``/proc/<pid>/task/<tid>/children``, so the walk reads a file per
thread of the trainer and of each descendant (a few dozen on a trainer with
workers), however many processes the host runs. Without those files (a
kernel built without them, another OS) the fallback reads every process's
parent from the whole process table (about 20 us a process).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psutil

from agent.system.errors import SamplerErrors

#: how often the trainers' descendants are looked for (a new trainer: at once)
CHILDREN_SCAN_INTERVAL_SECONDS = 5.0
#: whether this kernel lists each thread's children under /proc (CONFIG_PROC_CHILDREN)
PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


@dataclass
class _Trainer:
    """A watched trainer pid, and its process tree's CPU time at the last sample."""

    process: psutil.Process
    name: str
    cpu_seconds: float | None = None
    at: float = 0.0


class TrainerProcesses:
    """One line per running trainer, and the trainers that went since the last sample.

    ``pids()`` names the trainers (the agent passes the local ranks' pids);
    it is called at every sample. A line sums the trainer and its
    descendants: ``cpu_percent`` is their CPU time over the interval (100 =
    one core busy; descendants that exited count through the CPU time their
    parent collected when it reaped them), ``rss_bytes`` their resident
    memory (pages a trainer shares with its forked workers are counted in
    each), ``threads`` their threads, ``children`` how many descendants were
    alive. A trainer that exits, a zombie, or a pid that never ran is listed
    once under ``gone`` and then left out, until another process takes the pid.
    """

    def __init__(
        self,
        pids: Callable[[], Iterable[int]],
        errors: SamplerErrors,
        children_scan_interval: float = CHILDREN_SCAN_INTERVAL_SECONDS,
    ) -> None:
        self._pids = pids
        self._errors = errors
        self.children_scan_interval = children_scan_interval
        self._trainers: dict[int, _Trainer] = {}
        self._gone: dict[int, float | None] = {}  # pid -> create time of the process that went
        self._descendants: dict[int, list[psutil.Process]] = {}  # trainer pid -> last scan's
        self._scanned_at: float | None = None

    def sample(self, now: float) -> tuple[list[dict[str, Any]], list[int]]:
        """The running trainers' lines, and the pids gone since the last sample."""
        try:
            wanted = sorted({int(pid) for pid in self._pids()})
        except Exception as exc:  # the agent's callable; its bug is not a sampler crash
            self._errors.count("process_errors", "pids() raised %r", exc)
            return [], []
        for pid in [p for p in self._trainers if p not in wanted]:
            del self._trainers[pid]  # no longer the agent's concern
        self._gone = {pid: t for pid, t in self._gone.items() if pid in wanted}
        gone: list[int] = []
        live: list[_Trainer] = []
        for pid in wanted:
            trainer = self._trainers.get(pid) or self._watch(pid, gone)
            if trainer is None:
                continue
            if _alive(trainer.process):
                live.append(trainer)
            else:
                del self._trainers[pid]
                self._gone[pid] = create_time(trainer.process)
                gone.append(pid)
        if not live:
            self._descendants, self._scanned_at = {}, None
            return [], gone
        if (
            self._scanned_at is None
            or now - self._scanned_at >= self.children_scan_interval
            or any(t.process.pid not in self._descendants for t in live)
        ):
            self._descendants = self.scan([t.process for t in live])
            self._scanned_at = now
        lines = [
            _measure(trainer, self._descendants.get(trainer.process.pid, []), now)
            for trainer in live
        ]
        return [line for line in lines if line is not None], gone

    def scan(self, trainers: list[psutil.Process]) -> dict[int, list[psutil.Process]]:
        """Each trainer's descendants, by pid; the ones known from the last scan are reused."""
        known = {p.pid: p for kids in self._descendants.values() for p in kids}
        walk = proc_descendants if PROC_CHILDREN else ppid_walker()
        result: dict[int, list[psutil.Process]] = {}
        for trainer in trainers:
            found: list[psutil.Process] = []
            for pid in walk(trainer.pid):
                process = known.get(pid)
                if process is None:
                    try:
                        process = psutil.Process(pid)
                    except psutil.Error:
                        continue
                found.append(process)
            result[trainer.pid] = found
        return result

    def _watch(self, pid: int, gone: list[int]) -> _Trainer | None:
        """Start watching ``pid``; None (and listed in ``gone`` once) when it does not run."""
        try:
            process = psutil.Process(pid)
            if pid in self._gone and process.create_time() == self._gone[pid]:
                return None  # the same dead process, already reported
            name = process.name()
        except psutil.NoSuchProcess:
            if pid not in self._gone:
                self._gone[pid] = None
                gone.append(pid)
            return None
        except psutil.Error as exc:  # AccessDenied: another user's process
            self._errors.count("process_errors", "cannot watch pid %d: %r", pid, exc)
            return None
        self._gone.pop(pid, None)
        trainer = self._trainers[pid] = _Trainer(process, name)
        return trainer


def _alive(process: psutil.Process) -> bool:
    try:
        # is_running() also catches a pid reused by another process
        running = bool(process.is_running())
        return running and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _measure(
    trainer: _Trainer, children: list[psutil.Process], now: float
) -> dict[str, Any] | None:
    """The trainer's line, summed over it and its live ``children``; None if it just went."""
    try:
        cpu, rss, threads = usage(trainer.process)
    except psutil.Error:
        return None  # it went between the check and now; reported gone next sample
    alive = 0
    for child in children:
        try:
            child_cpu, child_rss, child_threads = usage(child)
        except psutil.Error:  # exited meanwhile: its time reaches the parent when reaped
            continue
        cpu += child_cpu
        rss += child_rss
        threads += child_threads
        alive += 1
    line: dict[str, Any] = {"pid": trainer.process.pid, "name": trainer.name}
    if trainer.cpu_seconds is not None and now > trainer.at:
        share = max(cpu - trainer.cpu_seconds, 0.0) / (now - trainer.at)
        line["cpu_percent"] = round(share * 100.0, 2)
    trainer.cpu_seconds, trainer.at = cpu, now
    line["rss_bytes"] = rss
    line["threads"] = threads
    line["children"] = alive
    return line


def usage(process: psutil.Process) -> tuple[float, int, int]:
    """(CPU seconds, RSS bytes, threads) of one process; CPU includes its reaped children's."""
    with process.oneshot():
        times = process.cpu_times()
        cpu = times.user + times.system
        cpu += getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
        return cpu, int(process.memory_info().rss), int(process.num_threads())


def create_time(process: psutil.Process) -> float | None:
    """When ``process`` started (what tells a pid's new process from its old one); None if gone."""
    try:
        return float(process.create_time())
    except psutil.Error:
        return None


def proc_descendants(root: int) -> list[int]:
    """Every descendant of ``root``, walked through ``/proc/<pid>/task/<tid>/children``.

    A process or thread that exits during the walk is skipped: it has no descendants
    left to count, and the next scan sees the tree as it is then.
    """
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as listing:
                    children = [int(child) for child in listing.read().split()]
            except OSError:
                continue
            found.extend(children)
            frontier.extend(children)
    return found


def ppid_walker() -> Callable[[int], list[int]]:
    """Descendants from one scan of the whole process table, shared by every trainer."""
    by_parent: dict[int, list[int]] = {}
    for process in psutil.process_iter(["ppid"]):
        by_parent.setdefault(process.info["ppid"], []).append(process.pid)

    def walk(root: int) -> list[int]:
        found: list[int] = []
        stack = list(by_parent.get(root, ()))
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(by_parent.get(pid, ()))
        return found

    return walk
