"""Per-second rates from growing counters (disk, network, PCIe bytes), read once a sample."""

from __future__ import annotations

from typing import Any


class CounterRates:
    """The rates of two counters since their previous reading, written into a sample line.

    The first reading only primes them. A counter that went backwards (a disk
    or interface removed, a driver reset) gives no rate for that reading.
    """

    def __init__(self, first: str, second: str) -> None:
        self.names = (first, second)
        self._last: tuple[float, int, int] | None = None  # (clock, first, second)

    def read(self, line: dict[str, Any], now: float, first: int, second: int) -> None:
        """Take a new reading at ``now``; put the rates since the last one into ``line``."""
        last = self._last
        if last is not None and now > last[0]:
            elapsed = now - last[0]
            if first >= last[1]:
                line[self.names[0]] = (first - last[1]) / elapsed
            if second >= last[2]:
                line[self.names[1]] = (second - last[2]) / elapsed
        self._last = (now, first, second)

    def forget(self) -> None:
        """The counters are gone: the next reading only primes them again."""
        self._last = None
