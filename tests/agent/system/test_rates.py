"""Rates from counters between samples: none on a first reading, a reset or a standing clock."""

from __future__ import annotations

from typing import Any

from agent.system.rates import CounterRates


def test_rates_are_deltas_per_second_after_a_first_reading() -> None:
    """The first reading primes; the next gives (change / seconds) for each counter."""
    rates = CounterRates("read", "written")
    line: dict[str, Any] = {}
    rates.read(line, 10.0, 1000, 500)
    assert line == {}
    rates.read(line, 12.0, 3000, 500)
    assert line == {"read": 1000.0, "written": 0.0}


def test_a_counter_that_goes_backwards_gives_no_rate_that_time() -> None:
    """A reset counter drops its own rate for one reading; the other counter keeps its rate."""
    rates = CounterRates("read", "written")
    rates.read({}, 10.0, 1000, 500)
    line: dict[str, Any] = {}
    rates.read(line, 11.0, 400, 900)
    assert line == {"written": 400.0}
    line = {}
    rates.read(line, 12.0, 600, 900)
    assert line == {"read": 200.0, "written": 0.0}


def test_no_rate_when_the_clock_has_not_moved_or_after_forget() -> None:
    """Two readings at the same instant, or a reading after forget(), give no rate."""
    rates = CounterRates("read", "written")
    rates.read({}, 10.0, 1000, 500)
    line: dict[str, Any] = {}
    rates.read(line, 10.0, 2000, 600)
    assert line == {}
    rates.forget()
    rates.read(line, 11.0, 3000, 700)
    assert line == {}
    rates.read(line, 12.0, 3100, 700)
    assert line == {"read": 100.0, "written": 0.0}
