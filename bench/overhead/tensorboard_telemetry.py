"""In-process TensorBoard: the same telemetry as the W&B variant through torch's
``SummaryWriter`` (``add_scalar`` x5 a step, ``add_histogram``, ``add_text``)."""

from __future__ import annotations

from overhead.telemetry import InProcessTelemetry, StepOutcome, Training, effective_rank


class TensorBoardTelemetry(InProcessTelemetry):
    label = "torch SummaryWriter (in-process)"

    def __init__(self, training: Training) -> None:
        super().__init__(training)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.workdir / "tensorboard"))

    def after_step(self, done: StepOutcome) -> None:
        args, add, step = self.args, self.writer.add_scalar, done.step
        add("loss", done.loss.item(), step)
        add("lr", done.lr, step)
        add("grad_norm", done.grad_norm.item(), step)
        add("step_time_seconds", done.step_time, step)
        add("tokens_per_second", self.tokens_per_second(done.step_time), step)
        if self._due("histograms", args.hist_every, step):
            for name, p in self.model.named_parameters():
                self.writer.add_histogram(f"weights/{name}", p.detach(), step)
                if p.grad is not None:
                    self.writer.add_histogram(f"grads/{name}", p.grad, step)
        if (hidden := self.features_due(step)) is not None:
            add("hidden/effective_rank", effective_rank(hidden), step)
        if done.sample is not None:
            self.writer.add_text("samples/generation", done.sample, step)

    def finish(self) -> None:
        self.writer.close()
