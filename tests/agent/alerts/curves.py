"""Synthetic training runs for the training-rule tests: loss, val/loss and lr per step.

Each curve is a noiseless shape times log-normal noise, so a test knows where
the smoothed loss really is (the shape) while the rules see what a trainer logs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.alerts.engine import AlertEngine
from tests.agent.alerts.helpers import RUN, Clock


@dataclass
class Run:
    """What a trainer logs: ``loss`` and ``lr`` each step, ``val/loss`` every ``val_every``."""

    shape: list[float]  # the noiseless train loss
    loss: list[float]
    lr: list[float] | None
    val: dict[int, float] = field(default_factory=dict)  # step -> val/loss

    def records(self) -> Iterator[tuple[int, dict[str, float]]]:
        for step, loss in enumerate(self.loss):
            record = {"loss": loss}
            if self.lr is not None:
                record["lr"] = self.lr[step]
            yield step, record
            if step in self.val:
                yield step, {"val/loss": self.val[step]}

    def doubling_step(self) -> int:
        """The first step after its lowest point where the shape is twice that lowest value."""
        low = min(range(len(self.shape)), key=self.shape.__getitem__)
        return next(s for s in range(low, len(self.shape)) if self.shape[s] >= 2 * self.shape[low])


def drive(engine: AlertEngine, clock: Clock, run: Run) -> list[dict[str, Any]]:
    """Feed the run to the engine, one step a second; the alerts fired, in order."""
    fired: list[dict[str, Any]] = []
    last = -1
    for step, record in run.records():
        if step != last:
            clock.advance(1)
            last = step
        engine.observe(RUN, 0, step, clock.now, record)
        fired.extend(engine.take_fired())
    return fired


def _noise(rng: random.Random, sigma: float) -> float:
    return math.exp(rng.gauss(0.0, sigma))


def _val(shape: list[float], rng: random.Random, every: int, sigma: float) -> dict[int, float]:
    """val/loss a little above the train shape, averaged over many batches: little noise."""
    return {s: 1.1 * shape[s] * _noise(rng, sigma) for s in range(every - 1, len(shape), every)}


def lr_range_test(seed: int = 0, steps: int = 800, sigma: float = 0.15) -> Run:
    """An LR range test left running: SGD+momentum with lr x1.015 every step. The loss
    falls, flattens, then climbs faster and faster (log loss quadratic in the steps past
    200): twice its lowest at step 303, hundreds of times it by step 500. No NaN."""
    rng = random.Random(seed)
    shape = [
        (0.4 + 1.9 * math.exp(-t / 40)) * math.exp(6.9e-5 * max(0, t - 200) ** 2)
        for t in range(steps)
    ]
    loss = [v * _noise(rng, sigma) for v in shape]
    lr = [0.01 * 1.015**t for t in range(steps)]
    return Run(shape, loss, lr, _val(shape, rng, 50, 0.02))


def healthy(
    seed: int = 0,
    steps: int = 2000,
    sigma: float = 0.15,
    shock_at: int | None = None,
    warmup: int = 0,
) -> Run:
    """A healthy run: loss decaying to a floor with noise, cosine lr after a linear warm-up.

    ``shock_at``: one corrupt batch (inputs x30, random labels) there: that
    step's loss x30, then the damaged weights lift the loss 4x, decaying over ~150 steps.
    """
    rng = random.Random(seed)
    shape = []
    for t in range(steps):
        value = 0.3 + 2.0 * math.exp(-t / 150)
        if shock_at is not None and t >= shock_at:
            value *= 1 + 3.0 * math.exp(-(t - shock_at) / 40)
        shape.append(value)
    loss = [v * _noise(rng, sigma) for v in shape]
    if shock_at is not None:
        loss[shock_at] *= 30
    lr = [
        3e-3 * (t / warmup if t < warmup else 0.5 * (1 + math.cos(math.pi * t / steps)))
        for t in range(steps)
    ]
    return Run(shape, loss, lr, _val(shape, rng, 50, 0.03))


def warmup_bump(peak: float, seed: int = 0, steps: int = 800, sigma: float = 0.1) -> Run:
    """Linear lr warm-up over 200 steps; the loss falls to 0.8, then bumps to ``peak`` times
    that around step 180 (the lr is getting large) and settles back."""
    rng = random.Random(seed)
    shape = [
        0.8 + 1.5 * math.exp(-t / 30) + (peak - 1) * 0.8 * math.exp(-(((t - 180) / 30) ** 2))
        for t in range(steps)
    ]
    loss = [v * _noise(rng, sigma) for v in shape]
    lr = [1e-3 * min(1.0, t / 200) for t in range(steps)]
    return Run(shape, loss, lr)


def overfit(seed: int = 0, steps: int = 1500, sigma: float = 0.1) -> Run:
    """Train loss keeps falling; val/loss bottoms out at step 600 and climbs 1% per 50 steps
    after it (with 1% noise): memorising, not generalising."""
    rng = random.Random(seed)
    shape = [0.05 + 2.0 * math.exp(-t / 300) for t in range(steps)]
    loss = [v * _noise(rng, sigma) for v in shape]
    val = {}
    for s in range(49, steps, 50):
        base = 0.6 + 1.6 * math.exp(-s / 100)
        val[s] = base * (1 + 0.01 * max(0, s - 600) / 50) * _noise(rng, 0.01)
    lr = [1e-3] * steps
    return Run(shape, loss, lr, val)
