"""Whether every core the trainer may run on is busy: the sender's cue to send less often.

Each message wakes the probe's sender, ZeroMQ's I/O threads and the agent's
receive loop. With a core idle those wake-ups cost the trainer nothing; when
every core it may run on is busy (torch's threads on all of them, or a trainer
pinned to its own core), each one is taken out of its steps. The cores are the
sender thread's own (its CPU affinity, the trainer's unless it was changed),
and the reading is the kernel's CPU accounting (``/proc/stat``, Linux), read
about once a second on the sender thread: no dependency, nothing on the
training thread. Where it cannot be read, the machine always reads as quiet.
"""

from __future__ import annotations

import os

STAT_PATH = "/proc/stat"
#: idle cores (summed over the trainer's cores) under which they count as busy...
BUSY_BELOW = 0.5
#: ... and over which they count as quiet again; in between the last state holds
QUIET_ABOVE = 0.75

_Reading = tuple[frozenset[int] | None, int, int, int]


class CoreLoad:
    """Idle cores among the trainer's between two readings, and whether that means busy."""

    def __init__(self, path: str = STAT_PATH, cpus: frozenset[int] | None = None) -> None:
        self.path = path
        self.cpus = cpus  # None: the calling thread's affinity, at each reading
        self.busy = False
        self.idle_cores: float | None = None  # at the last reading; None before two
        self._last: _Reading | None = None

    def update(self) -> bool:
        """Read the counters again; returns whether the cores were busy since the last read."""
        reading = self._read()
        if reading is None:
            return self.busy
        last, self._last = self._last, reading
        if last is None or last[:2] != reading[:2] or reading[3] <= last[3]:
            return self.busy  # a first reading, other cores, or under a clock tick since
        cpus, cores, idle_ticks, total_ticks = reading
        if cpus is None:
            cores = os.cpu_count() or 1  # the machine's sum: ticks of every core
        idle = cores * (idle_ticks - last[2]) / (total_ticks - last[3])
        self.idle_cores = idle
        if self.busy and idle > QUIET_ABOVE:
            self.busy = False
        elif not self.busy and idle < BUSY_BELOW:
            self.busy = True
        return self.busy

    def _cpus(self) -> frozenset[int] | None:
        """The cores to read, or None for all of the machine's (the ``cpu`` line alone)."""
        if self.cpus is not None or not hasattr(os, "sched_getaffinity"):
            return self.cpus
        cpus = frozenset(os.sched_getaffinity(0))
        return None if len(cpus) >= (os.cpu_count() or 1) else cpus

    def _read(self) -> _Reading | None:
        """The cores read (None: all), how many lines, their idle and total clock ticks;
        None if unreadable."""
        try:
            cpus = self._cpus()
            with open(self.path, "rb") as stat:
                fields = stat.readline().split()  # the machine's sum: the ``cpu`` line
                if cpus is None:
                    return (None, 1, *_ticks(fields)) if fields[0] == b"cpu" else None
                idle = total = read = 0
                for line in iter(stat.readline, b""):  # each core's line follows
                    fields = line.split()
                    if not fields or not fields[0].startswith(b"cpu"):
                        break  # past the cores (the long interrupt counts are never parsed)
                    if int(fields[0][3:]) in cpus:
                        core_idle, core_total = _ticks(fields)
                        idle, total, read = idle + core_idle, total + core_total, read + 1
            return (cpus, read, idle, total) if read else None
        except (OSError, ValueError, IndexError):
            return None


def _ticks(fields: list[bytes]) -> tuple[int, int]:
    """Idle and total clock ticks of one ``cpu`` line: user nice system idle iowait irq
    softirq steal (guest time is in user already)."""
    ticks = [int(value) for value in fields[1:9]]
    return ticks[3] + ticks[4], sum(ticks)
