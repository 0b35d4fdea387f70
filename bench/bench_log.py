"""Training-thread cost of logging 10 scalars: probe.log against wandb, TensorBoard, bare zmq.

Why: the product's promise is "full telemetry for under 1% slowdown", and the
budget for ``probe.log`` is <= 1 us median, p99 <= 3 us, on the training
thread (docs/performance.md). Every contender is timed per call with
``time.perf_counter_ns`` in the same process, in interleaved rounds (the
order rotates each round), so machine noise hits all of them alike and the
ratios are taken side by side. The cost of the timer and of the call wrapper
is measured in the same rounds as an "empty call" contender and subtracted.

The probe talks to a real ``outrider agent`` process over ipc; at the end the
script counts how many of the logged records reached the agent's run store.

    python bench/bench_log.py            # ~1.5 min
    python bench/bench_log.py --quick    # ~25 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import orjson
import zmq
from _common import (
    SCALAR_NAMES,
    load_average,
    machine,
    percentile,
    print_table,
    short_ipc_endpoint,
    start_agent,
    stop_agent,
)

import probe

RUN_ID = "bench-log"

# A PULL socket in its own process that receives and discards: the far end of "bare zmq".
DRAIN_CODE = """
import sys, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.PULL)
sock.bind(sys.argv[1])
print("ready", flush=True)
while True:
    sock.recv()
"""


def metrics_for(i: int) -> dict[str, float]:
    """A fresh dict of 10 float scalars per step, as a trainer would build it (not timed)."""
    x = float(i)
    return {name: x * 0.001 + k for k, name in enumerate(SCALAR_NAMES)}


@dataclass
class Contender:
    """One logging method: a per-call function, plus untimed work after each round
    (or after every ``chunk`` calls, when set)."""

    name: str
    call: Callable[[dict[str, float], int], Any]
    after_round: Callable[[], Any] = lambda: None
    chunk: int = 0
    samples: list[int] = field(default_factory=list)  # ns per call, raw
    round_medians: list[float] = field(default_factory=list)
    step: int = 0


def time_round(contender: Contender, calls: int) -> None:
    """Time ``calls`` calls one by one; the dict is built outside the timed region."""
    now = time.perf_counter_ns
    call = contender.call
    out = [0] * calls
    step = contender.step
    chunk = contender.chunk or calls
    for j in range(calls):
        metrics = metrics_for(step + j)
        t0 = now()
        call(metrics, step + j)
        t1 = now()
        out[j] = t1 - t0
        if (j + 1) % chunk == 0 and j + 1 < calls:
            contender.after_round()
    contender.step = step + calls
    contender.after_round()
    contender.samples.extend(out)
    out.sort()
    contender.round_medians.append(percentile(out, 50))


def timer_overhead_ns(n: int = 200_000) -> float:
    """Median of back-to-back perf_counter_ns pairs, for the report."""
    now = time.perf_counter_ns
    out = [0] * n
    for j in range(n):
        t0 = now()
        t1 = now()
        out[j] = t1 - t0
    out.sort()
    return percentile(out, 50)


def empty_call(metrics: dict[str, float], step: int) -> None:
    """The calibration contender: timer plus a Python call, nothing logged."""


def make_probes(endpoint: str, calls: int) -> list[Contender]:
    """probe.log against the real agent, in two regimes that share one probe.

    burst: the whole round back to back, so the queue passes the sender's
    wake-up mark (512 records) within one flush interval; paced: an untimed
    flush every 256 calls keeps the queue below it, as a trainer logging once
    per step does. A flush after each round (untimed) keeps the sender
    thread's backlog from spilling into the next contender's round.
    """
    probe.init(endpoint=endpoint, run_id=RUN_ID)
    log = probe.log

    def call(metrics: dict[str, float], step: int) -> None:
        log(metrics, step=step)

    def flush() -> None:
        probe.flush(10)

    return [
        Contender(f"probe.log, burst ({calls} back to back)", call, after_round=flush),
        Contender(
            "probe.log, paced (256, then a flush)", call, after_round=flush, chunk=256, step=10**8
        ),
    ]


def wait_probe_connected(warmup: int) -> int:
    """Log until the sender has handshaken with the agent and delivered something."""
    logged = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for _ in range(warmup):
            probe.log(metrics_for(logged), step=logged)
            logged += 1
        probe.flush(5)
        if probe.stats().get("sent", 0) > 0:
            return logged
        time.sleep(0.1)
    raise RuntimeError("the probe never connected to the agent")


def make_wandb(tmp: Path) -> tuple[Contender, Callable[[], None]]:
    os.environ.update(
        WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_DIR=str(tmp)
    )
    import wandb

    run = wandb.init(project="outrider-bench", dir=str(tmp))
    log = wandb.log
    contender = Contender("wandb.log (offline)", lambda metrics, step: log(metrics, step=step))
    return contender, run.finish


def make_torch_tb(tmp: Path) -> tuple[Contender, Callable[[], None]]:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(tmp / "tb-torch"))
    add = writer.add_scalar

    def call(metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            add(name, value, step)

    return Contender("torch SummaryWriter.add_scalar x10", call, writer.flush), writer.close


def make_tf_free_tb(tmp: Path) -> tuple[Contender, Callable[[], None]]:
    from tensorboard.summary import Writer

    writer = Writer(str(tmp / "tb-native"))
    add = writer.add_scalar

    def call(metrics: dict[str, float], step: int) -> None:
        for name, value in metrics.items():
            add(name, value, step)

    return Contender("tensorboard.summary.Writer x10", call, writer.flush), writer.close


def make_bare_zmq(tmp: Path) -> tuple[Contender, Callable[[], None], list[int]]:
    """msgpack.packb + PUSH send(NOBLOCK) of the same dict, to a PULL in another process."""
    endpoint = short_ipc_endpoint(tmp, "drain.sock")
    drain = subprocess.Popen(
        [sys.executable, "-P", "-c", DRAIN_CODE, endpoint], stdout=subprocess.PIPE
    )
    assert drain.stdout is not None
    if drain.stdout.readline().strip() != b"ready":
        raise RuntimeError("the PULL drain process did not start")
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.connect(endpoint)
    again = [0]
    deadline = time.monotonic() + 10
    while True:  # IMMEDIATE: sends fail until the connection is up
        try:
            sock.send(b"hi", zmq.NOBLOCK)
            break
        except zmq.Again:
            if time.monotonic() > deadline:
                raise RuntimeError("could not connect to the PULL drain") from None
            time.sleep(0.01)
    packb, send, noblock, full = msgpack.packb, sock.send, zmq.NOBLOCK, zmq.Again

    def call(metrics: dict[str, float], step: int) -> None:
        try:
            send(packb(metrics), noblock)
        except full:
            again[0] += 1

    def close() -> None:
        sock.close(0)
        context.term()
        drain.terminate()
        drain.wait()

    return Contender("msgpack.packb + zmq PUSH send(NOBLOCK)", call), close, again


def store_report(runs_dir: Path, logged: int, stats: dict[str, Any]) -> None:
    """How many probe.log records reached metrics.jsonl, against the probe's own counters."""
    run_dir = runs_dir / RUN_ID
    stored = 0
    with open(run_dir / "metrics.jsonl", "rb") as lines:
        for line in lines:
            if b'"kind":"scalars"' in line and b'"stream":"agent"' not in line:
                stored += 1  # the trainer's records, not the agent's derived statistics
    info = orjson.loads((run_dir / "run.json").read_bytes())
    print("\nprobe -> agent store")
    print(f"  probe.log calls          {logged}")
    print(
        f"  probe stats              sent={stats.get('sent')} (incl. control records) "
        f"dropped={stats.get('dropped')} queue_depth={stats.get('queue_depth')}"
    )
    print(f"  scalars lines stored     {stored}  ({stored / logged:.4%} of probe.log calls)")
    print(
        f"  run.json                 records={info.get('records')} dropped={info.get('dropped')} "
        f"lost={info.get('lost')} status={info.get('status')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per contender per round")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (pooled)")
    parser.add_argument("--quick", action="store_true", help="1200 calls x 3 rounds (~25 s)")
    parser.add_argument("--no-wandb", action="store_true", help="skip wandb (slow to start)")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.rounds = 1200, 3
    if args.calls > 9000:
        parser.error("--calls must stay under the probe's queue size (10000)")

    tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-log-"))
    runs_dir = tmp / "runs"
    endpoint = short_ipc_endpoint(tmp)
    closers: list[Callable[[], None]] = []
    agent = start_agent(endpoint, runs_dir, tmp / "agent.log")
    try:
        started = time.monotonic()
        contenders = [Contender("(empty call: timer + wrapper)", empty_call)]
        contenders.extend(make_probes(endpoint, args.calls))
        logged = wait_probe_connected(300)
        bare, close_bare, again = make_bare_zmq(tmp)
        closers.append(close_bare)
        contenders.append(bare)
        for make in (make_torch_tb, make_tf_free_tb) + (() if args.no_wandb else (make_wandb,)):
            contender, close = make(tmp)
            contenders.append(contender)
            closers.append(close)
        print(f"set-up {time.monotonic() - started:.1f} s; warming up", file=sys.stderr)

        for contender in contenders:  # warm-up round, discarded
            time_round(contender, min(args.calls, 300))
            contender.samples.clear()
            contender.round_medians.clear()
        logged += 2 * min(args.calls, 300)

        timer_ns = timer_overhead_ns()
        load_before = load_average()
        for r in range(args.rounds):
            shift = r % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                time_round(contender, args.calls)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        logged += 2 * args.calls * args.rounds
        load = (load_before, load_average())

        probe.flush(10)
        stats = probe.stats()
        probe.finish(10)
    finally:
        for close in closers:
            close()
        stop_agent(agent)

    report(contenders, args.calls, args.rounds, timer_ns, again[0], load)
    store_report(runs_dir, logged, stats)
    shutil.rmtree(tmp, ignore_errors=True)


def report(
    contenders: list[Contender],
    calls: int,
    rounds: int,
    timer_ns: float,
    again: int,
    load: tuple[float, float],
) -> None:
    print("\nbench_log: training-thread cost of logging 10 scalars, one call at a time")
    print(f"machine: {machine()}; 1-min load average {load[0]:.1f} -> {load[1]:.1f}")
    print(
        f"{rounds} interleaved rounds x {calls} calls per contender, pooled "
        f"({rounds * calls} samples each); GC enabled"
    )
    calibration = sorted(contenders[0].samples)
    overhead = percentile(calibration, 50)
    print(
        f"timer: perf_counter_ns pair {timer_ns:.0f} ns; empty call (timer + wrapper) "
        f"{overhead:.0f} ns median, subtracted from every other row"
    )
    figures = []
    for contender in contenders:
        ordered = sorted(contender.samples)
        minus = 0.0 if contender is contenders[0] else overhead
        spread = sorted(contender.round_medians)
        figures.append(
            (
                contender.name,
                max(0.0, percentile(ordered, 50) - minus) / 1000,
                max(0.0, percentile(ordered, 99) - minus) / 1000,
                max(0.0, sum(ordered) / len(ordered) - minus) / 1000,
                f"{(spread[0] - minus) / 1000:.2f}-{(spread[-1] - minus) / 1000:.2f}",
            )
        )
    burst, paced = figures[1][1], figures[2][1]
    rows = [
        [
            name,
            f"{median:.2f}",
            f"{p99:.2f}",
            f"{mean:.2f}",
            spread,
            "-" if i == 0 else f"{median / paced:.1f}x",
            "-" if i == 0 else f"{median / burst:.1f}x",
        ]
        for i, (name, median, p99, mean, spread) in enumerate(figures)
    ]
    print()
    print_table(
        [
            "contender",
            "median us",
            "p99 us",
            "mean us",
            "round medians us",
            "/ probe paced",
            "/ probe burst",
        ],
        rows,
    )
    print(f"\nbare zmq sends refused at the high-water mark (zmq.Again): {again}")
    print("budget: probe.log of 10 scalars <= 1 us median, p99 <= 3 us, on the training thread")


if __name__ == "__main__":
    main()
