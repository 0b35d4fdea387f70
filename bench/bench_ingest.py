"""Agent ingest throughput into the run store, and probe -> store latency at nominal load.

Why: the agent must keep up with every rank of a node (budget >= 1,000,000
scalar values/s into the run store) and stay close behind the trainer
(budget: probe -> run store p99 <= 50 ms at nominal load); see
docs/performance.md. Three measurements, interleaved where they repeat:

* end-to-end: 1 and 2 sender processes push pre-built messages (512
  ``scalars`` records of 10 metrics each, packed exactly as the probe packs
  them: protocol version 2, scalar blocks) over ipc to a real ``outrider
  agent`` process; timed from the go signal until metrics.jsonl holds every
  line (tail-read every 5 ms). One sender of version 1 messages (the
  previous probes' format, one map per record) runs alongside, for the ratio.
* in-process: the same messages of both versions through ``Agent.ingest()``
  (+ the store flush the receive loop does), with ``decode()`` alone and
  bare ``msgpack.unpackb`` as reference points. No socket, no second process.
* latency: a trainer process calls the real ``probe.log`` at a steady rate;
  each line's ``t`` (time.time() at the log call) is compared with the time
  this script first reads the line from metrics.jsonl (1 ms polling).

    python bench/bench_ingest.py            # ~1.5 min
    python bench/bench_ingest.py --quick    # ~20 s
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import queue
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import msgpack
import orjson
import psutil
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
    wait_for_lines,
)

from agent.daemon import Agent
from agent.ingest.decode import decode
from probe import protocol
from probe.blocks import to_blocks

BUDGET_VALUES_PER_S = 1_000_000
BUDGET_LATENCY_P99_MS = 50.0
BATCH = 512  # records per message: the probe's default max_batch
E2E_1 = "e2e, 1 sender process"
E2E_1_V1 = "e2e, 1 sender process, v1 messages"
E2E_2 = "e2e, 2 sender processes"
VALUES_PER_RECORD = len(SCALAR_NAMES)


def build_messages(
    run_id: str, stream: str, records: int, first_step: int = 0, version: int = protocol.VERSION
) -> list[bytes]:
    """Messages as the probe's sender packs them: [version, envelope, records], with scalar
    blocks from version 2 on.

    Values vary per record, so orjson's float formatting does realistic work.
    """
    envelope = {
        "run": run_id,
        "stream": stream,
        "rank": 0,
        "local_rank": 0,
        "world_size": 1,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    packer = msgpack.Packer(use_bin_type=True)
    now = time.time()
    messages = []
    for start in range(0, records, BATCH):
        batch = []
        for seq in range(start, min(start + BATCH, records)):
            step = first_step + seq
            body = {name: (step * 0.000123 + k) / 3.0 for k, name in enumerate(SCALAR_NAMES)}
            batch.append([protocol.SCALARS, seq, now + seq * 1e-4, step, body])
        wire = to_blocks(batch) if version >= 2 else batch
        messages.append(packer.pack([version, envelope, wire]))
    return messages


# -- end-to-end over the socket ---------------------------------------------------------------


def sender_process(
    endpoint: str,
    run_id: str,
    stream: str,
    records: int,
    first_step: int,
    version: int,
    ready: Any,
    go: Event,
    results: Any,
) -> None:
    """Build messages, connect, wait for go, then push them all (blocking sends: this
    measures the agent, so the sender waits at the high-water mark instead of dropping)."""
    messages = build_messages(run_id, stream, records, first_step, version)
    context = zmq.Context()
    sock = context.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 60_000)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(endpoint)
    if not monitor.poll(10_000):
        raise RuntimeError("no handshake with the agent")
    ready.put(stream)
    go.wait()
    t0 = time.perf_counter()
    for message in messages:
        sock.send(message, copy=False)
    results.put((stream, t0, time.perf_counter()))
    sock.disable_monitor()
    monitor.close()
    sock.close()  # lingers until everything is handed to the agent
    context.term()


def wait_ready(ready: Any, procs: list[Any], timeout: float = 120.0) -> None:
    """Wait for one 'ready' per child process, failing fast if one dies."""
    deadline = time.monotonic() + timeout
    pending = len(procs)
    while pending:
        try:
            ready.get(timeout=0.1)
            pending -= 1
        except queue.Empty:
            if any(proc.exitcode not in (None, 0) for proc in procs):
                raise RuntimeError("a child process died during set-up") from None
            if time.monotonic() > deadline:
                raise RuntimeError("child processes did not get ready in time") from None


def end_to_end(
    tmp: Path, senders: int, records: int, version: int = protocol.VERSION
) -> dict[str, float]:
    """One fresh agent, ``senders`` processes sharing ``records``; rates from the go signal."""
    run_dir = tmp / f"e2e-{senders}-v{version}"
    runs_dir = run_dir / "runs"
    endpoint = short_ipc_endpoint(tmp)
    agent = start_agent(endpoint, runs_dir, run_dir / "agent.log")
    context = mp.get_context("spawn")
    ready, go, results = context.Queue(), context.Event(), context.Queue()
    share = records // senders
    procs = [
        context.Process(
            target=sender_process,
            args=(endpoint, "ingest", f"sender{i}", share, i * share, version, ready, go, results),
        )
        for i in range(senders)
    ]
    sampler = RssSampler(agent.pid)
    try:
        for proc in procs:
            proc.start()
        wait_ready(ready, procs)  # every sender has built its messages and is connected
        cpu0 = sampler.cpu_seconds()
        sampler.start()
        t0 = time.perf_counter()
        go.set()
        done = wait_for_lines(
            runs_dir / "ingest" / "metrics.jsonl",
            share * senders,
            timeout=max(60.0, records / 5000),
        )
        cpu = sampler.cpu_seconds() - cpu0
        sampler.stop()
        if done is None:
            raise RuntimeError(f"the agent did not store {share * senders} lines in time")
        sends = [results.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(60)
    finally:
        sampler.stop()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        stop_agent(agent)
    info = orjson.loads((runs_dir / "ingest" / "run.json").read_bytes())
    shutil.rmtree(run_dir, ignore_errors=True)
    seconds = done - t0
    stored = share * senders
    return {
        "records_per_s": stored / seconds,
        "seconds": seconds,
        "send_seconds": max(end for _, _, end in sends) - t0,
        "records_per_agent_cpu_s": stored / cpu if cpu > 0 else float("nan"),
        "peak_rss_mb": sampler.peak / 2**20,
        "lost": float(info.get("lost", 0)),
    }


class RssSampler:
    """Peak RSS and CPU time of the agent process, sampled on a thread of this process."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu_seconds(self) -> float:
        times = self.process.cpu_times()
        return float(times.user + times.system)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return


# -- in-process ------------------------------------------------------------------------------


def in_process(tmp: Path, messages: list[bytes], records: int) -> dict[str, float]:
    """Records/s of bare unpackb, decode(), and Agent.ingest() + store flush, same messages
    (all of one protocol version)."""
    rates: dict[str, float] = {}

    def timed(name: str, body: Callable[[], None]) -> None:
        gc.collect()
        t0 = time.perf_counter()
        body()
        rates[name] = records / (time.perf_counter() - t0)

    def unpack_all() -> None:
        for raw in messages:
            msgpack.unpackb(raw, raw=False)

    def decode_all() -> None:
        for raw in messages:
            decode(raw)

    agent = Agent(short_ipc_endpoint(tmp), tmp / "inproc-runs")
    agent.ingest(build_messages("ingest", "warm", 1)[0])  # open the run store outside the timing

    def ingest_all() -> None:
        for raw in messages:
            agent.ingest(raw)
        agent.runs.flush()

    timed("unpackb", unpack_all)
    timed("decode", decode_all)
    timed("ingest", ingest_all)
    agent.close()
    shutil.rmtree(tmp / "inproc-runs", ignore_errors=True)
    return rates


# -- latency ---------------------------------------------------------------------------------


def trainer_process(endpoint: str, rate: float, seconds: float, ready: Any, go: Event) -> None:
    """A trainer logging 10 scalars at a steady ``rate`` through the real probe."""
    import probe

    probe.init(endpoint=endpoint, run_id="latency")
    while probe.stats().get("sent", 0) == 0:  # until the sender has handshaken
        probe.log({"warmup": 1.0})
        probe.flush(1)
        time.sleep(0.05)
    ready.put("trainer")
    go.wait()
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        delay = start + i / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        probe.log({name: (i * 0.001 + k) / 3.0 for k, name in enumerate(SCALAR_NAMES)}, step=i)
    probe.finish(10)


def latency(tmp: Path, rate: float, seconds: float) -> dict[str, float]:
    """probe.log -> line readable in metrics.jsonl, per record, at a steady load."""
    runs_dir = tmp / "latency-runs"
    endpoint = short_ipc_endpoint(tmp)
    agent = start_agent(endpoint, runs_dir, tmp / "latency-agent.log")
    context = mp.get_context("spawn")
    ready, go = context.Queue(), context.Event()
    trainer = context.Process(target=trainer_process, args=(endpoint, rate, seconds, ready, go))
    expected = int(rate * seconds)
    delays: list[float] = []
    gaps: list[float] = []
    try:
        trainer.start()
        wait_ready(ready, [trainer])
        go.set()
        with open(runs_dir / "latency" / "metrics.jsonl", "rb") as handle:
            tail = b""
            bye = False
            last = time.perf_counter()
            deadline = last + seconds + 30
            while len(delays) < expected and not bye and last < deadline:
                time.sleep(0.001)
                chunk = handle.read()
                seen = time.time()
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
                if not chunk:
                    continue
                *lines, tail = (tail + chunk).split(b"\n")
                for line in lines:
                    if b'"stream":"agent"' in line:
                        continue  # the agent's own lines (window statistics) are not records
                    if b'"kind":"scalars"' in line and b'"warmup"' not in line:
                        delays.append(seen - orjson.loads(line)["t"])
                    elif b'"kind":"bye"' in line:
                        bye = True
        trainer.join(30)
    finally:
        if trainer.is_alive():
            trainer.kill()
        stop_agent(agent)
    delays.sort()
    gaps.sort()
    return {
        "count": float(len(delays)),
        "expected": float(expected),
        "p50_ms": percentile(delays, 50) * 1000,
        "p99_ms": percentile(delays, 99) * 1000,
        "max_ms": (delays[-1] if delays else float("nan")) * 1000,
        "poll_p50_ms": percentile(gaps, 50) * 1000,
        "poll_p99_ms": percentile(gaps, 99) * 1000,
    }


# -- report ----------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=5.0, help="length of the latency run at nominal load"
    )
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="probe.log calls per second in the latency run"
    )
    parser.add_argument(
        "--records", type=int, default=200_000, help="records per throughput run (10 values each)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved throughput repeats")
    parser.add_argument(
        "--quick", action="store_true", help="50k records, 1 repeat, 3 s latency run (~20 s)"
    )
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.records, args.repeats = 3.0, 50_000, 1
    records = args.records // (2 * BATCH) * 2 * BATCH  # whole messages for 1 and 2 senders

    tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-ingest-"))
    messages = build_messages("ingest", "inproc", records)
    previous = build_messages("ingest", "inproc", records, version=1)
    rows: dict[str, list[dict[str, float]]] = {}
    load_before = load_average()
    try:
        runs: list[tuple[str, Callable[[], dict[str, float]]]] = [
            (E2E_1, lambda: end_to_end(tmp, 1, records)),
            (E2E_1_V1, lambda: end_to_end(tmp, 1, records, version=1)),
            (E2E_2, lambda: end_to_end(tmp, 2, records)),
            ("in-process", lambda: in_process(tmp, messages, records)),
            ("in-process v1", lambda: in_process(tmp, previous, records)),
        ]
        for r in range(args.repeats):
            for name, run in runs:
                rows.setdefault(name, []).append(run())
            print(f"throughput repeat {r + 1}/{args.repeats} done", flush=True, file=sys.stderr)
        lat = latency(tmp, args.rate, args.seconds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, lat, records, args, (load_before, load_average()))


def report(
    rows: dict[str, list[dict[str, float]]],
    lat: dict[str, float],
    records: int,
    args: argparse.Namespace,
    load: tuple[float, float],
) -> None:
    print("\nbench_ingest: agent ingest into the run store (metrics.jsonl)")
    print(f"machine: {machine()}; 1-min load average {load[0]:.1f} -> {load[1]:.1f}")
    print(
        f"{records:,} records x {VALUES_PER_RECORD} values per run, {BATCH} records per "
        f"message ({len(build_messages('x', 'y', BATCH)[0]):,} bytes in version "
        f"{protocol.VERSION}, {len(build_messages('x', 'y', BATCH, version=1)[0]):,} in "
        "version 1); "
        f"median of {args.repeats} interleaved repeats (min-max of records/s alongside)"
    )
    table = []

    def add(name: str, runs: list[float]) -> None:
        rate = statistics.median(runs)
        table.append(
            [
                name,
                f"{rate:,.0f}",
                spread(runs),
                f"{rate * VALUES_PER_RECORD:,.0f}",
                f"{rate * VALUES_PER_RECORD / BUDGET_VALUES_PER_S:.2f}",
            ]
        )

    e2e = (E2E_1, E2E_1_V1, E2E_2)
    for name in e2e:
        add(name, [r["records_per_s"] for r in rows[name]])
    for key, label in (("in-process", "v2"), ("in-process v1", "v1")):
        inproc = rows[key]
        add(f"in-process Agent.ingest() + flush, {label}", [r["ingest"] for r in inproc])
        add(f"in-process decode() only, {label}", [r["decode"] for r in inproc])
        add(f"in-process msgpack.unpackb only, {label}", [r["unpackb"] for r in inproc])
    print()
    print_table(["path", "records/s", "min-max", "values/s", "x budget"], table)
    print(
        f"budget: >= {BUDGET_VALUES_PER_S:,} scalar values/s into the run store; "
        "decode() = msgpack + validation, ingest() adds accounting, JSON and the write"
    )
    ratio = statistics.median(r["records_per_s"] for r in rows[E2E_1]) / statistics.median(
        r["records_per_s"] for r in rows[E2E_1_V1]
    )
    print(f"end to end, one sender: version 2 (scalar blocks) / version 1 = {ratio:.2f}x")

    details = []
    for name in e2e:
        runs = rows[name]
        details.append(
            [
                name,
                f"{statistics.median(r['send_seconds'] for r in runs):.2f}",
                f"{statistics.median(r['seconds'] for r in runs):.2f}",
                f"{statistics.median(r['records_per_agent_cpu_s'] for r in runs):,.0f}",
                f"{max(r['peak_rss_mb'] for r in runs):.0f}",
                f"{sum(r['lost'] for r in runs):.0f}",
            ]
        )
    print()
    print_table(
        [
            "end-to-end detail",
            "sends done s",
            "all stored s",
            "records / agent CPU-s",
            "agent peak RSS MB",
            "lost",
        ],
        details,
    )
    print(
        "(sends finish at once: ZeroMQ's queues, SNDHWM 1000 + the agent's RCVHWM 10000 "
        "messages, hold the whole run, so 'all stored' is the agent's own pace)"
    )

    print(
        f"\nprobe.log -> line in metrics.jsonl, {args.rate:,.0f} records/s for "
        f"{args.seconds:g} s (real probe in a trainer process, real agent)"
    )
    print_table(
        ["records seen", "p50 ms", "p99 ms", "max ms", "budget p99 ms", "poll gap p50/p99 ms"],
        [
            [
                f"{lat['count']:.0f}/{lat['expected']:.0f}",
                f"{lat['p50_ms']:.1f}",
                f"{lat['p99_ms']:.1f}",
                f"{lat['max_ms']:.1f}",
                f"{BUDGET_LATENCY_P99_MS:.0f}",
                f"{lat['poll_p50_ms']:.2f}/{lat['poll_p99_ms']:.2f}",
            ]
        ],
    )
    print(
        "resolution: a line is stamped when this script's poll first reads it, so each "
        "figure is late by at most one poll gap (column above)"
    )


if __name__ == "__main__":
    main()
