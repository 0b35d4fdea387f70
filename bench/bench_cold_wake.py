"""CPU of the agent's per-message work in a warm loop against after a sleep, as a step's is.

Why: a trainer's step sends one message, so the agent's receive loop and the
probe's threads run once a step, after sleeping the rest of it. The same
work costs far more CPU after a sleep than in a loop (caches, branch
predictors and the TLB went cold; on a shared guest other tenants ran in
between), and that, not the work's size, sets the telemetry's fixed cost per
step (docs/performance.md, "A fixed cost per step"). Each piece of work is
timed by this thread's CPU clock around single calls: back to back, then
each after ``--sleep`` seconds of sleep. The messages are captured from a
real probe (5 scalars a step) over a real PULL socket.

    python bench/bench_cold_wake.py            # ~2 min
    python bench/bench_cold_wake.py --quick    # ~35 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq
from _common import load_average, machine, print_table, short_ipc_endpoint

import probe
from agent.daemon import Agent
from agent.ingest.decode import decode


def captured_messages(tmp: Path, count: int) -> list[bytes]:
    """``count`` one-step messages from a real probe, read off a PULL socket."""
    endpoint = short_ipc_endpoint(tmp, "capture.sock")
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.bind(endpoint)
    probe.init(endpoint=endpoint, run_id="cold-wake")
    for step in range(count):
        probe.log({"loss": 1 / (step + 1), "lr": 0.1, "grad_norm": 2.0, "tps": 1e3}, step=step)
        probe.flush()
    probe.finish()
    messages = []
    while pull.poll(1000):
        messages.append(pull.recv())
    pull.close(linger=0)
    context.term()
    return [m for m in messages if len(m) < 1000]  # the steps' (the hello is larger)


def cpu_us(work: Callable[[], object]) -> float:
    started = time.thread_time_ns()
    work()
    return (time.thread_time_ns() - started) / 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per contender and side")
    parser.add_argument("--sleep", type=float, default=0.1, help="seconds before a cold call")
    parser.add_argument("--quick", action="store_true", help="50 calls")
    args = parser.parse_args()
    calls = 50 if args.quick else args.calls
    tmp = Path(tempfile.mkdtemp(prefix="bcw-"))
    load_start = load_average()
    try:
        messages = captured_messages(tmp, 2 * calls + 10)  # each ingested once
        agent = Agent(short_ipc_endpoint(tmp), tmp / "runs")
        agent.ingest(messages[0])  # the run store opens outside the timing
        agent.runs.flush()
        fd = os.open(tmp / "append.bin", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        line = b"x" * 200
        sample = messages[1]
        feed = iter(messages[1:])

        def ingest() -> None:
            agent.ingest(next(feed))
            agent.runs.flush()

        contenders: dict[str, Callable[[], object]] = {
            "nothing (the clock)": lambda: None,
            "sum(range(1000))": lambda: sum(range(1000)),
            "os.write of 200 bytes": lambda: os.write(fd, line),
            "msgpack.unpackb of a step's message": lambda: msgpack.unpackb(sample),
            "agent decode() of it": lambda: decode(sample),
            "agent ingest + run store flush": ingest,
        }
        rows = []
        for name, work in contenders.items():
            warm = [cpu_us(work) for _ in range(calls)]
            cold = []
            for _ in range(calls):
                time.sleep(args.sleep)
                cold.append(cpu_us(work))
            warm_us, cold_us = statistics.median(warm), statistics.median(cold)
            rows.append([name, f"{warm_us:.1f}", f"{cold_us:.1f}", f"{cold_us / warm_us:.0f}x"])
        os.close(fd)
        agent.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(machine())
    print(
        f"{len(sample)}-byte messages; thread CPU per call, median of {calls} calls back to "
        f"back (warm) and {calls} each after {args.sleep:g} s of sleep (cold)"
    )
    print_table(["work", "warm us", "cold us", "cold / warm"], rows)
    print(f"load average (1 min) {load_start:.2f} -> {load_average():.2f}")


if __name__ == "__main__":
    main()
