"""What the alert tests share: a hand-driven clock, an engine with chosen rules, sample feeds."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping
from typing import Any

from agent.alerts.config import BUILTIN_RULES, AlertsConfig
from agent.alerts.engine import AlertEngine

RUN = "run-1"
RSS = "system/process/4242/rss_bytes"


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    rules: Mapping[str, Any] | None = None,
    *,
    keep: Iterable[str] = (),
    clock: Clock | None = None,
    **section: Any,
) -> tuple[AlertEngine, Clock]:
    """An engine with only the built-ins in ``keep`` plus ``rules``, delivering to store only."""
    clock = clock or Clock()
    keep = set(keep)
    all_rules: dict[str, Any] = {
        name: {"enabled": False} for name in BUILTIN_RULES if name not in keep
    }
    all_rules.update(rules or {})
    section.setdefault("default_destinations", ["store"])
    config = AlertsConfig.model_validate({"rules": all_rules, **section})
    return AlertEngine(config, clock=clock, strict=True), clock


def names(engine: AlertEngine) -> list[str]:
    return [alert["name"] for alert in engine.take_fired()]


def feed(
    engine: AlertEngine,
    clock: Clock,
    metric: str,
    values: Iterable[float],
    *,
    start: int = 0,
    dt: float = 1.0,
    rank: int = 0,
) -> list[dict[str, Any]]:
    """One sample per step and per ``dt`` seconds (sample time = clock); the alerts fired."""
    fired: list[dict[str, Any]] = []
    for step, value in enumerate(values, start=start):
        clock.advance(dt)
        engine.observe(RUN, rank, step, clock.now, {metric: value})
        fired.extend(engine.take_fired())
    return fired


def noisy(base: float, sigma: float, n: int, seed: int = 0, trend: float = 0.0) -> list[float]:
    """``base`` with multiplicative log-normal noise and a relative trend per step."""
    rng = random.Random(seed)
    return [base * math.exp(trend * i + rng.gauss(0.0, sigma)) for i in range(n)]
