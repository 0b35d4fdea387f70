"""The host's figures: CPU, load, memory, swap, and disk and network rates.

A few psutil calls a sample. ``cpu_percent`` is computed from CPU-time
counters as ``psutil.cpu_percent(interval=None)`` does, but from this
sampler's own previous reading, so other users of psutil in the agent do not
disturb it.
"""

from __future__ import annotations

from typing import Any

import psutil

from agent.system.rates import CounterRates

#: network interfaces left out of the network rates: loopback is the agent's own traffic
LOOPBACK_INTERFACES = frozenset({"lo", "lo0"})


class HostSampler:
    """Writes the host fields of a sample; rates need the previous sample, so the first has none."""

    def __init__(self) -> None:
        self.cpu_count = psutil.cpu_count() or 0
        self._cpu_last: tuple[float, float] | None = None  # (total, busy) CPU seconds
        self._disk = CounterRates("disk_read_bytes_per_s", "disk_write_bytes_per_s")
        self._net = CounterRates("net_recv_bytes_per_s", "net_sent_bytes_per_s")

    def sample(self, entry: dict[str, Any], now: float) -> None:
        """Add the host fields to ``entry``; ``now`` is the sampler's monotonic clock."""
        self._cpu_percent(entry)
        entry["cpu_count"] = self.cpu_count
        entry["load1"] = psutil.getloadavg()[0]
        memory = psutil.virtual_memory()
        entry["memory_used_bytes"] = int(memory.used)
        entry["memory_total_bytes"] = int(memory.total)
        entry["memory_available_bytes"] = int(memory.available)
        entry["swap_used_bytes"] = int(psutil.swap_memory().used)
        disk = psutil.disk_io_counters()  # None where the OS has no disk counters
        if disk is not None:
            self._disk.read(entry, now, int(disk.read_bytes), int(disk.write_bytes))
        else:
            self._disk.forget()
        nics = psutil.net_io_counters(pernic=True) or {}
        received = sum(c.bytes_recv for n, c in nics.items() if n not in LOOPBACK_INTERFACES)
        sent = sum(c.bytes_sent for n, c in nics.items() if n not in LOOPBACK_INTERFACES)
        self._net.read(entry, now, received, sent)

    def _cpu_percent(self, entry: dict[str, Any]) -> None:
        """Busy share of all CPUs since the last sample (busy = total - idle - iowait)."""
        times = psutil.cpu_times()
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        busy = total - times.idle - getattr(times, "iowait", 0.0)
        if self._cpu_last is not None:
            elapsed = total - self._cpu_last[0]
            if elapsed > 0:
                share = (busy - self._cpu_last[1]) / elapsed
                entry["cpu_percent"] = round(min(max(share, 0.0), 1.0) * 100.0, 2)
        self._cpu_last = (total, busy)
