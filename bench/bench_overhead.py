"""Training slowdown of the demo model under monitoring, against no monitoring.

Why: the product's headline promise is "full training telemetry for under 1%
slowdown" (docs/performance.md, the budget). This script trains the demo model
(``examples/train_charlm.py``: its data, model, batches and learning-rate
schedule, reused as they are) for a fixed number of steps, once per variant,
in interleaved repeats (A B C D, then D C B A, ...). Every run is a fresh
subprocess, so hooks, threads and sink processes never leak from one variant
into the next. The timed region is the training loop only (after warm-up
steps); set-up and shutdown (agent drain, ``wandb.finish``) are outside it.

Two kinds of figure: the wall clock (loop and step times, slowdown against the
paired baseline run) and the direct cost measured inside the trainer (time
the training thread spends in telemetry code and optimizer hooks, and the CPU
time of the trainer's other threads). On a noisy shared machine the wall clock
cannot resolve 1%; the direct cost can. See docs/performance.md.

Variants (``KIND:PLACEMENT``):

- ``base``: no monitoring (``OUTRIDER_DISABLED=1``, no agent).
- ``outrider-log``: the transport floor: ``probe.log`` of loss, lr, grad norm,
  step time and throughput every step to a real agent, nothing else.
- ``outrider``: full telemetry through the probe to a real agent process
  (``--sinks none``: the run store only); ``outrider+sinks`` the same with the
  agent's default sinks (TensorBoard, Prometheus on a free port, W&B offline).
  Full telemetry = ``probe.watch(model, opt, log_every=1, hist_every=100,
  activations_every=100)`` (watch's defaults; ``--hist-every``) +
  ``probe.features`` of the last hidden state every
  100 steps + ``probe.log`` of loss/lr every step + a ``probe.text`` sample
  every 200 steps.
- ``wandb``: in-process W&B (offline), the telemetry the way tutorials write
  it: ``.item()`` on loss and grad norm and ``wandb.log`` every step,
  ``wandb.Histogram`` of every weight and gradient every 100 steps, the
  effective rank (SVD of the last hidden state) every 100 steps, a text
  sample every 200 steps.
- ``tensorboard``: the same with torch's ``SummaryWriter``.

Placements:

- ``sep`` (separate cores): the trainer pinned to CPU 0 with
  ``torch.set_num_threads(1)``; the agent (or W&B's service process) pinned
  to CPU 1. Threads inside the trainer process (the probe's sender, the
  TensorBoard writer) stay on CPU 0 with the training thread.
- ``shared``: nothing pinned, torch's default thread count; trainer and agent
  share every core.

Each monitored variant is compared with the baseline of the same placement,
repeat by repeat (same round, same thread settings).

    python bench/bench_overhead.py             # default: 20-35 min on 2 CPUs
    python bench/bench_overhead.py --quick     # 2 repeats x 100 steps: ~8-10 min
    python bench/bench_overhead.py --variants sep --repeats 5

The parts live in ``bench/overhead/``: the variants, each backend's
telemetry, the worker (one training run), the runner and the report.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import load_average, machine
from overhead.report import report
from overhead.runner import Run, run_variant
from overhead.variants import DEFAULT_VARIANTS, KINDS, PLACEMENTS, expand_variants
from overhead.worker import worker


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The bench's options; the hidden ones make this same script a worker (one run)."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--steps",
        type=int,
        default=200,
        help="timed steps per run (default 200: every periodic kind at its rate)",
    )
    p.add_argument(
        "--warmup", type=int, default=5, help="untimed steps just before the timed ones (default 5)"
    )
    p.add_argument(
        "--start",
        type=int,
        default=50,
        help="step number of the first timed step (default 50: with 200 steps the "
        "window 50-249 holds histograms at 50, 100, 150 and 200, features at "
        "100 and 200 and a text sample at 200, each at its nominal rate)",
    )
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    p.add_argument("--quick", action="store_true", help="2 repeats x 100 steps")
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated KIND:PLACEMENT names, or a kind / placement for all "
        "matching (baselines are added); default: all but outrider-log:shared",
    )
    p.add_argument(
        "--hist-every",
        type=int,
        default=100,
        help="weight/grad histograms and activation stats (default 100, watch's own default)",
    )
    p.add_argument(
        "--rank-every",
        type=int,
        default=100,
        help="hidden-state features / effective rank (default 100)",
    )
    p.add_argument("--text-every", type=int, default=200, help="text samples (default 200)")
    p.add_argument(
        "--layer-every",
        type=int,
        default=10,
        help="probe.watch per-layer norms (default 10, watch's own default)",
    )
    p.add_argument(
        "--flush-interval",
        type=float,
        default=0.02,
        help="the probe's flush_interval, seconds (default 0.02, the probe's default; "
        "longer merges steps into fewer messages)",
    )
    p.add_argument(
        "--busy-flush-interval",
        type=float,
        default=0.25,
        help="the probe's busy_flush_interval, seconds: its window while every core is busy "
        "(default 0.25, the probe's default; 0 keeps --flush-interval always)",
    )
    # The demo's model and data (examples/train_charlm.py defaults).
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--data-bytes", type=int, default=3_000_000)
    # Internal: one run in this process.
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--placement", choices=PLACEMENTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--endpoint", help=argparse.SUPPRESS)
    p.add_argument("--run-id", help=argparse.SUPPRESS)
    p.add_argument("--agent-pid", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 2, 100
    if args.start < args.warmup:
        p.error("--start must be at least --warmup (warm-up steps are numbered before it)")
    return args


def main() -> None:
    """Every variant once per repeat, in alternating order, then the report."""
    args = parse_args()
    if args.worker:
        worker(args)
        return
    variants = expand_variants(args.variants)
    if (os.cpu_count() or 1) < 2 and any(v.endswith(":sep") for v in variants):
        print("fewer than 2 CPUs: skipping the separate-cores variants")
        variants = [v for v in variants if not v.endswith(":sep")]
    print(f"machine: {machine()}")
    print(
        f"variants: {', '.join(variants)}; {args.repeats} repeats x ({args.warmup} warm-up + "
        f"{args.steps} timed steps); the probe's flush_interval {args.flush_interval:g} s, "
        f"busy_flush_interval {args.busy_flush_interval:g} s"
    )
    load_start = load_average()
    started = time.perf_counter()
    runs: dict[str, list[Run]] = {v: [] for v in variants}
    tmp = Path(tempfile.mkdtemp(prefix="bov-"))
    try:
        index = 0
        for repeat in range(args.repeats):
            # A B C D, D C B A, ...: a slow drift of the machine hits no variant more often.
            for variant in variants if repeat % 2 == 0 else variants[::-1]:
                run = run_variant(variant, args, tmp, index)
                index += 1
                runs[variant].append(run)
                print(
                    f"repeat {repeat + 1}/{args.repeats}  {variant:24s} loop {run.loop_s:6.2f} s"
                    f"  median step {1000 * statistics.median(run.step_times):6.1f} ms",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(variants, runs, args)
    print(
        f"\nload average (1 min) {load_start:.2f} -> {load_average():.2f}; "
        f"total {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
