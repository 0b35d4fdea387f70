"""What a monitored training run adds to the loop, and the baseline that adds nothing.

The worker calls the same methods on every variant at the same points of the
step, so the variants differ only in what these methods do. Each backend
(``outrider_telemetry``, ``wandb_telemetry``, ``tensorboard_telemetry``)
subclasses :class:`Telemetry`; the class itself is the baseline.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn


@dataclass(slots=True)
class Training:
    """What the telemetry watches: the run's options, the demo module, its model and
    optimizer, and a working directory that is removed after the run."""

    args: argparse.Namespace
    demo: ModuleType
    model: nn.Module
    opt: torch.optim.Optimizer
    workdir: Path


@dataclass(slots=True)
class StepOutcome:
    """One finished step as the loop hands it over: built before the telemetry's timer
    starts, so its cost falls on every variant alike."""

    step: int
    loss: Tensor
    grad_norm: Tensor
    lr: float
    step_time: float
    sample: str | None


class Telemetry:
    """No monitoring: the baseline. Subclasses add one backend's telemetry."""

    label = "none"

    def __init__(self, training: Training) -> None:
        self.args = training.args
        self.demo = training.demo
        self.model = training.model
        self.opt = training.opt
        self.workdir = training.workdir
        self.step = 0
        self.sampling = False
        self.notes: list[str] = []
        self.events: dict[str, list[int]] = {}
        self.hook_s = 0.0  # time in this object's forward hook since the worker last read it

    def before_step(self, step: int) -> None:
        self.step = step

    def hook_hidden(self) -> None:
        """A forward hook on the final layer norm (the last hidden state), timed."""

        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self.sampling:
                return
            started = time.perf_counter()
            self.on_hidden(output)
            self.hook_s += time.perf_counter() - started

        self.model.get_submodule("ln_f").register_forward_hook(hook)

    def on_hidden(self, output: Tensor) -> None:
        pass

    def generate(self, step: int) -> str | None:
        """The demo's own text sample on text steps, in every variant (the baseline too):
        generating it is the trainer's work, logging it is the telemetry's."""
        if self._due("text", self.args.text_every, step):
            return self._sample_text()
        return None

    def after_step(self, done: StepOutcome) -> None:
        pass

    def at_loop_end(self) -> dict[str, Any]:
        """Counters read right after the timed loop, before any flush."""
        return {}

    def close(self) -> dict[str, Any]:
        return {}

    def tokens_per_second(self, step_time: float) -> float:
        return self.args.batch_size * self.args.context / step_time

    def _due(self, kind: str, every: int, step: int) -> bool:
        """Whether periodic work of ``kind`` falls on ``step``; records the step if so, for
        the report's list of what the timed window held."""
        if every > 0 and step % every == 0:
            self.events.setdefault(kind, []).append(step)
            return True
        return False

    def _sample_text(self) -> str:
        """The demo's 120-byte sample; the hidden-state hooks skip its forward passes."""
        self.sampling = True
        try:
            return str(self.demo.sample(self.model, 120, "cpu", self.args.seed))
        finally:
            self.sampling = False


class InProcessTelemetry(Telemetry):
    """Telemetry the way tutorials write it for an in-process library (W&B, TensorBoard):
    the last hidden state kept by the forward hook, its effective rank computed in the
    loop, and the library's own writer flushed at the end, timed."""

    def __init__(self, training: Training) -> None:
        super().__init__(training)
        self.hidden: Tensor | None = None
        self.hook_hidden()

    def on_hidden(self, output: Tensor) -> None:
        self.hidden = output.detach()

    def features_due(self, step: int) -> Tensor | None:
        """The last hidden state on a features step (its effective rank is due), else None."""
        if self.hidden is not None and self._due("features", self.args.rank_every, step):
            return self.hidden
        return None

    def close(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.finish()
        return {"finish_s": time.perf_counter() - started}

    def finish(self) -> None:
        """The library's own end of run (``wandb.finish``, ``SummaryWriter.close``)."""


def effective_rank(hidden: Tensor) -> float:
    """RankMe effective rank of (rows, dim) features, computed in the loop with an SVD."""
    import torch

    s = torch.linalg.svdvals(hidden.reshape(-1, hidden.shape[-1]).float())
    p = s / s.sum() + 1e-7
    return float(torch.exp(-(p * p.log()).sum()).item())
