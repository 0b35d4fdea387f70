"""In-process W&B (offline), the telemetry the way tutorials write it.

``.item()`` on loss and grad norm and ``wandb.log`` every step,
``wandb.Histogram`` of every weight and gradient every ``hist_every`` steps,
the effective rank of the last hidden state every ``rank_every``, and the
demo's text sample: less than ``probe.watch`` collects, and a W&B row every
step.
"""

from __future__ import annotations

import os
from typing import Any

from overhead.placement import AGENT_CPU, pin_threads_of
from overhead.telemetry import InProcessTelemetry, StepOutcome, Training, effective_rank


class WandbTelemetry(InProcessTelemetry):
    label = "wandb (offline, in-process)"

    def __init__(self, training: Training) -> None:
        super().__init__(training)
        workdir = self.workdir
        os.environ.update(
            WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DIR=str(workdir)
        )
        import wandb

        self.wandb = wandb
        self.run = wandb.init(
            project="outrider-bench",
            dir=str(workdir),
            mode="offline",
            config={"steps": self.args.steps},
        )
        if self.args.placement == "sep":
            # W&B's service process gets the other core, as the agent does.
            import psutil

            children = psutil.Process().children()
            pinned = sum(pin_threads_of(child.pid, {AGENT_CPU}) for child in children)
            self.notes.append(
                f"pinned {pinned} threads of W&B's service process to CPU {AGENT_CPU}"
            )

    def after_step(self, done: StepOutcome) -> None:
        args, wandb, step = self.args, self.wandb, done.step
        row: dict[str, Any] = {
            "loss": done.loss.item(),
            "lr": done.lr,
            "grad_norm": done.grad_norm.item(),
            "step_time_seconds": done.step_time,
            "tokens_per_second": self.tokens_per_second(done.step_time),
        }
        if self._due("histograms", args.hist_every, step):
            for name, p in self.model.named_parameters():
                row[f"weights/{name}"] = wandb.Histogram(p.detach().cpu().numpy())
                if p.grad is not None:
                    row[f"grads/{name}"] = wandb.Histogram(p.grad.detach().cpu().numpy())
        if (hidden := self.features_due(step)) is not None:
            row["hidden/effective_rank"] = effective_rank(hidden)
        if done.sample is not None:
            row["samples/generation"] = wandb.Html(f"<pre>{done.sample}</pre>")
        wandb.log(row, step=step)

    def finish(self) -> None:
        self.run.finish()
