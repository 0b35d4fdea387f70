"""outrider's telemetry: the probe in the trainer, a real agent beside it.

``outrider-log`` is the transport floor (``probe.log`` of five scalars a
step, nothing else); ``outrider`` and ``outrider+sinks`` are full telemetry:
``probe.watch`` with every kind on, ``probe.features`` of the last hidden
state, ``probe.log`` of loss and lr, and ``probe.text`` of the demo's sample.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from overhead.telemetry import StepOutcome, Telemetry, Training

if TYPE_CHECKING:
    from torch import Tensor


class OutriderTelemetry(Telemetry):
    label = "outrider probe"

    def __init__(self, training: Training) -> None:
        super().__init__(training)
        import probe

        args = self.args
        self.probe = probe
        started = probe.init(
            endpoint=args.endpoint,
            run_id=args.run_id,
            flush_interval=args.flush_interval,
            busy_flush_interval=args.busy_flush_interval,
        )
        if not started:
            raise RuntimeError("probe.init() did not start: no agent?")
        probe.config({"bench": "bench_overhead", "steps": args.steps, "warmup": args.warmup})
        self.log_only = args.kind == "outrider-log"
        # A source tree without probe.watch (--compare style runs) gets a hand-written
        # fallback, and says so in the report.
        self.full = hasattr(probe, "watch") and hasattr(probe, "features")
        self.has_features = hasattr(probe, "features")
        if self.log_only:
            return
        if self.full:
            probe.watch(
                self.model,
                self.opt,
                log_every=1,
                layer_every=args.layer_every,
                hist_every=args.hist_every,
                activations_every=args.hist_every,
                batch_size=args.batch_size,
                tokens_per_step=args.batch_size * args.context,
                start_step=args.start - args.warmup,
            )
        else:
            self.notes.append(
                "WARNING: probe.watch is missing: hand-written fallback (probe.log of loss/lr/"
                "grad_norm/step time every step, probe.histogram of weights and grads every "
                f"{args.hist_every} steps, hidden features every {args.rank_every} steps); "
                "this is NOT the full-telemetry figure"
            )
        self.hook_hidden()
        self.time_activation_hooks()

    def time_activation_hooks(self) -> None:
        """Add probe.watch's activation hooks (forward hooks on activation steps) to the
        training thread's time in telemetry: each hook's work, timed where it runs."""
        watcher = sys.modules.get("probe.watcher")  # imported by probe.watch
        take = getattr(getattr(watcher, "Watcher", None), "_take_activation", None)
        if watcher is None or take is None:
            self.notes.append("activation hooks not timed: this probe has no Watcher")
            return

        def timed(owner: Any, name: str, output: Any) -> None:
            started = time.perf_counter()
            try:
                take(owner, name, output)
            finally:
                self.hook_s += time.perf_counter() - started

        watcher.Watcher._take_activation = timed  # this run's process only

    def on_hidden(self, output: Tensor) -> None:
        if self.has_features:
            self.probe.features("hidden", output, self.step, every=self.args.rank_every)
        elif self.step % self.args.rank_every == 0:
            self.probe.tensor("hidden", output.detach().flatten(0, 1)[::8], step=self.step)

    def after_step(self, done: StepOutcome) -> None:
        args, step = self.args, done.step
        if self.full and not self.log_only:
            self.probe.log({"loss": done.loss.detach(), "lr": done.lr}, step=step)
        else:
            self.probe.log(
                {
                    "loss": done.loss.detach(),
                    "lr": done.lr,
                    "grad_norm": done.grad_norm,
                    "step_time_seconds": done.step_time,
                    "tokens_per_second": self.tokens_per_second(done.step_time),
                },
                step=step,
            )
            if self.log_only:
                return
            if self._due("histograms", args.hist_every, step):
                for name, p in self.model.named_parameters():
                    self.probe.histogram(f"weights/{name}", p.detach(), step=step)
                    if p.grad is not None:
                        self.probe.histogram(f"grads/{name}", p.grad, step=step)
        if self.full:
            self._due("histograms", args.hist_every, step)  # probe.watch does them; count only
        self._due("features", args.rank_every, step)
        if done.sample is not None:
            self.probe.text("samples/generation", done.sample, step=step)

    def at_loop_end(self) -> dict[str, Any]:
        stats = self.probe.stats()
        return {
            "queue_at_loop_end": stats.get("queue_depth"),
            "flush_window_at_loop_end": stats.get("flush_window"),
        }

    def close(self) -> dict[str, Any]:
        self.probe.flush(30)
        stats = self.probe.stats()
        self.probe.finish(10)
        return {"probe_stats": stats}
