"""The failures the suite injects, each from a known step on (its onset).

An injection changes one thing the training loop does, at the points where
such failures enter real runs: the learning rate (a runaway range test, a
schedule stuck at zero), the batch (a corrupt one, a data pipeline that
repeats a tiny shard), the loss (a NaN, a huge scale), the weights (a zeroed
restore), the graph (SimSiam without its stop-gradient), what the loop keeps
(a cache that is never cleared), and the process (a hang, a kill).
"""

from __future__ import annotations

import os
import signal
import time

import torch
from torch import Tensor

from bench.failures.families import Batch, Family


class Injection:
    """No failure: the healthy run. Subclasses override the hooks they need."""

    name = "none"

    def __init__(self, onset: int) -> None:
        self.onset = onset

    def active(self, step: int) -> bool:
        return self.name != "none" and step >= self.onset

    def start(self, family: Family, optimizer: torch.optim.Optimizer) -> None:
        """Called once, at the onset step, before its batch."""

    def lr_factor(self, step: int) -> float:
        return 1.0

    def batch(self, step: int, batch: Batch, family: Family, gen: torch.Generator) -> Batch:
        return batch

    def loss(self, step: int, loss: Tensor) -> Tensor:
        """The loss that is backpropagated (the logged one stays the model's)."""
        return loss

    def after_step(self, step: int, loss: Tensor) -> None:
        """Called after the step's records are logged."""


class NaN(Injection):
    """A NaN loss at the onset, stepped like any other: the weights become NaN for good."""

    name = "nan"

    def loss(self, step: int, loss: Tensor) -> Tensor:
        return loss * float("nan") if step == self.onset else loss


class Spike(Injection):
    """One corrupt batch at the onset: inputs x30 and random labels; the run recovers."""

    name = "spike"

    def batch(self, step: int, batch: Batch, family: Family, gen: torch.Generator) -> Batch:
        if step != self.onset:
            return batch
        x, y = batch
        if x.is_floating_point():
            x = x * 30
        else:  # tokens: random ones
            x = torch.randint(int(x.max()) + 1, x.shape, generator=gen)
        return x, family.random_labels(y, gen)


class Divergence(Injection):
    """The learning rate x1.015 every step from the onset: an LR range test left running."""

    name = "divergence"

    def lr_factor(self, step: int) -> float:
        return 1.015 ** max(0, step - self.onset)


class Exploding(Injection):
    """The backpropagated loss x10,000 from the onset (a lost loss-scale division)."""

    name = "exploding"

    def loss(self, step: int, loss: Tensor) -> Tensor:
        return loss * 1e4 if self.active(step) else loss


class Vanishing(Injection):
    """Every weight zeroed and the optimizer state reset at the onset (a restore from an
    all-zero checkpoint): a ReLU network at zero has exactly zero gradients."""

    name = "vanishing"

    def start(self, family: Family, optimizer: torch.optim.Optimizer) -> None:
        with torch.no_grad():
            for param in family.model.parameters():
                param.zero_()
        optimizer.state.clear()


class Plateau(Injection):
    """The learning rate dropped to ~0 (x1e-6) from the onset: a schedule stuck at its floor."""

    name = "plateau"

    def lr_factor(self, step: int) -> float:
        return 1e-6 if self.active(step) else 1.0


class Overfitting(Injection):
    """From the onset the model trains on its first 32 samples only (a data pipeline that
    repeats one tiny shard); validation stays on the true distribution."""

    name = "overfitting"

    def start(self, family: Family, optimizer: torch.optim.Optimizer) -> None:
        family.pool = 32


class Collapse(Injection):
    """SimSiam without its stop-gradient from the onset: the embedding collapses."""

    name = "collapse"

    def start(self, family: Family, optimizer: torch.optim.Optimizer) -> None:
        family.stop_gradient = False


class Leak(Injection):
    """From the onset every step keeps 256 KiB for good (a debugging cache of each step's
    tensors that is never cleared); the pages are written, so resident memory grows."""

    name = "leak"
    bytes_per_step = 256 * 1024

    def __init__(self, onset: int) -> None:
        super().__init__(onset)
        self.kept: list[Tensor] = []

    def after_step(self, step: int, loss: Tensor) -> None:
        if self.active(step):
            self.kept.append(torch.full((self.bytes_per_step // 4,), float(step)))


class Stall(Injection):
    """The trainer hangs (sleeps) at the onset for ``seconds``, then goes on."""

    name = "stall"
    seconds = 30.0

    def after_step(self, step: int, loss: Tensor) -> None:
        if step == self.onset:
            time.sleep(self.seconds)


class Death(Injection):
    """SIGKILL at the onset, as the OOM killer does: no bye, no exit handlers."""

    name = "death"

    def after_step(self, step: int, loss: Tensor) -> None:
        if step == self.onset:
            os.kill(os.getpid(), signal.SIGKILL)


INJECTIONS: dict[str, type[Injection]] = {
    cls.name: cls
    for cls in (
        Injection,
        NaN,
        Spike,
        Divergence,
        Exploding,
        Vanishing,
        Plateau,
        Overfitting,
        Collapse,
        Leak,
        Stall,
        Death,
    )
}
