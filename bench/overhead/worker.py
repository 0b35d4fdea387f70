"""One training run in its own process: ``warmup + steps`` steps of the demo, the last
``steps`` timed, the figures written to a JSON result file.

A fresh process per run keeps hooks, threads and sink processes from leaking
into the next variant. The timed region is the training loop only; set-up
and the telemetry's close (probe flush, ``wandb.finish``) come after it.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from _common import load_demo

from overhead.counters import LoopCounters
from overhead.outrider_telemetry import OutriderTelemetry
from overhead.placement import TRAINER_CPU
from overhead.telemetry import StepOutcome, Telemetry, Training
from overhead.tensorboard_telemetry import TensorBoardTelemetry
from overhead.wandb_telemetry import WandbTelemetry

TELEMETRY: dict[str, type[Telemetry]] = {
    "base": Telemetry,
    "outrider-log": OutriderTelemetry,
    "outrider": OutriderTelemetry,
    "outrider+sinks": OutriderTelemetry,
    "outrider+sinks-live": OutriderTelemetry,
    "wandb": WandbTelemetry,
    "tensorboard": TensorBoardTelemetry,
}


class OptimizerMarks:
    """Time the telemetry's optimizer hooks from outside.

    Optimizer hooks run in registration order: marks registered before the
    telemetry's own hooks (``probe.watch``) and marks registered after them
    bracket those hooks, pre-step and post-step.
    """

    def __init__(self, opt: Any) -> None:
        self.opt = opt
        self.marks: dict[str, float] = {}
        self._register("0")

    def after_telemetry(self) -> None:
        self._register("1")

    def hooks_s(self) -> float:
        """Seconds in the telemetry's optimizer hooks during the last ``optimizer.step()``."""
        marks = self.marks
        return marks["pre1"] - marks["pre0"] + marks["post1"] - marks["post0"]

    def _register(self, side: str) -> None:
        self.opt.register_step_pre_hook(self._mark(f"pre{side}"))
        self.opt.register_step_post_hook(self._mark(f"post{side}"))

    def _mark(self, key: str) -> Any:
        marks = self.marks

        def hook(optimizer: Any, hook_args: Any, hook_kwargs: Any) -> None:
            marks[key] = time.perf_counter()

        return hook


def worker(args: argparse.Namespace) -> None:
    """Train ``warmup + steps`` steps, time the last ``steps``, write a JSON result."""
    if args.placement == "sep":
        os.sched_setaffinity(0, {TRAINER_CPU})  # before torch starts any thread
        os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch
    import torch.nn.functional as F

    if args.placement == "sep":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    demo = load_demo()
    torch.manual_seed(args.seed)
    raw = demo.load_stdlib_text(args.data_bytes)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    train = data[: int(0.9 * len(data))]
    gen = torch.Generator().manual_seed(args.seed)
    model = demo.CharLM(args.context, args.layers, args.d_model, args.heads)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    marks = OptimizerMarks(opt)
    x = torch.randn(256, 256)
    (x @ x).sum().item()  # torch's thread pools are started by now (the baseline checks it)
    counters = LoopCounters(args.agent_pid)
    telemetry = TELEMETRY[args.kind](Training(args, demo, model, opt, Path(args.workdir)))
    marks.after_telemetry()

    total = args.warmup + args.steps
    first = args.start - args.warmup  # the warm-up steps come just before the timed window
    step_times: list[float] = []
    telemetry_times: list[float] = []  # training-thread time in telemetry code, per step
    loop_start = loop_start_unix = 0.0
    last = time.perf_counter()
    for i in range(total):
        step = first + i
        if i == args.warmup:
            loop_start = last = time.perf_counter()
            loop_start_unix = time.time()
            counters.start()
        telemetry.before_step(step)
        telemetry.hook_s = 0.0
        lr = demo.lr_at(i, total, args.lr)
        for group in opt.param_groups:
            group["lr"] = lr
        x, y = demo.get_batch(train, args.batch_size, args.context, gen)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_time = max(time.perf_counter() - last, 1e-9)
        sample = telemetry.generate(step)
        done = StepOutcome(step, loss, grad_norm, lr, step_time, sample)
        started = time.perf_counter()
        telemetry.after_step(done)
        now = time.perf_counter()
        if i >= args.warmup:
            step_times.append(now - last)
            telemetry_times.append(now - started + telemetry.hook_s + marks.hooks_s())
        last = now
    loop_s = time.perf_counter() - loop_start
    loop_end_unix = time.time()
    result: dict[str, Any] = {
        "loop_s": loop_s,
        "loop_unix": [loop_start_unix, loop_end_unix],
        **counters.stop(),
        "telemetry_times": telemetry_times,
        "step_times": step_times,
        "final_loss": float(loss.item()),
        "threads": torch.get_num_threads(),
        "affinity": sorted(os.sched_getaffinity(0)),
        **telemetry.at_loop_end(),
    }
    result.update(telemetry.close())
    measured = range(args.start, args.start + args.steps)
    result["events"] = {k: [s for s in v if s in measured] for k, v in telemetry.events.items()}
    result["notes"] = telemetry.notes
    Path(args.result).write_text(json.dumps(result))
