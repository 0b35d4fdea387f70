"""Job aggregator cost per rank, and rank -> job view latency, against simulated node agents.

Why: the budget is >= 1,000 ranks at 10 steps/s per aggregator core, with a rank's
closed window in the job view within 2 s (p99); see docs/performance.md and
docs/scale.md. One real aggregator process (``python -P -m agent aggregator``,
sinks off by default) is fed over loopback TCP (plain, the real transport) by
simulated node agents: each node is one real :class:`agent.aggregation.uplink.Uplink`
forwarding what ``agent.aggregation.forwarding`` forwards for ``--ranks-per-node``
ranks, i.e. a hello, one ``window`` item per rank per closed window (a window summary
shaped like the node's: ``--metrics`` metrics of count/nonfinite/mean/std/min/max/last,
the derived step-time percentiles and throughput, host/local_rank/restart/world_size),
an ``accounting`` item every 5 s with one ledger per rank, and the uplink's own
heartbeats. Several nodes share one sender process (``--node-processes``), one
Uplink (thread and ZeroMQ context) each: a 2-core machine cannot run 128 node agents.

Each node's ranks close window k at ``start + (k + 1) * window_steps / steps_per_second``
plus a per-node phase within one step (synchronous training: every rank closes the same
window within a step). A window's ``t_end`` is the moment its node forwards it.

Measured, after one window of warm-up, over ``--seconds``:

* the aggregator's CPU seconds per second (psutil, its process and children) and per
  rank, its peak RSS, the items it received per second (run.json's ledgers);
* rank -> job view latency: ``t_end`` to the moment this script first reads the
  window's line in the job's metrics.jsonl (tail-read every 10 ms);
* at the end, each node's uplink accounting from run.json (``job.nodes``):
  sent == received + dropped + lost, and lost == 0.

    python bench/bench_aggregator.py                      # 64, 256, 1024 ranks, ~6 min
    python bench/bench_aggregator.py --quick              # 64 and 256 ranks, ~1.5 min
    python bench/bench_aggregator.py --ranks 1024 --window-steps 10   # 10x the windows
"""

from __future__ import annotations

import argparse
import contextlib
import math
import multiprocessing as mp
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import orjson
import psutil
from _common import agent_cpu_by_part, load_average, machine, percentile, print_table

from agent.aggregation import wire
from agent.cli.launcher import OUTRIDER

BUDGET_RANKS_PER_CORE = 1000
BUDGET_LATENCY_P99_S = 2.0
JOB = "bench-job"
ACCOUNTING_SECONDS = 5.0
TARGET_RANKS = 8000
#: names every real run has, so that stragglers, divergence and extremes have work to do
CORE_METRICS = ("loss", "grad_norm", "lr", "tokens_per_second", "step_time_seconds")
_T_END = re.compile(rb'"t_end":([-0-9.eE+]+)')


# -- the simulated node agents ---------------------------------------------------------------


def metric_names(count: int) -> list[str]:
    extra = [f"train/layer{i // 8}/{('w', 'g', 'a', 'u')[i % 4]}_norm{i % 2}" for i in range(count)]
    return (list(CORE_METRICS) + extra)[:count]


def window_body(
    node: str,
    rank: int,
    local_rank: int,
    world_size: int,
    index: int,
    window_steps: int,
    steps_per_s: float,
    names: list[str],
    rng: random.Random,
) -> dict[str, Any]:
    """One rank's window summary as the node agent stores and forwards it."""
    t_end = time.time()
    first = index * window_steps
    last = first + window_steps - 1
    metrics = {}
    for k, name in enumerate(names):
        mean = (k + 1) * (1.0 + 0.01 * rng.random())
        std = 0.05 * mean
        metrics[name] = {
            "mean": mean,
            "std": std,
            "min": mean - 2 * std,
            "max": mean + 2 * std,
            "count": window_steps,
            "nonfinite": 0,
            "last": mean + std * (rng.random() - 0.5),
        }
    step_time = 1.0 / steps_per_s * (1.0 + 0.02 * rng.random())
    derived = {
        "step_time_seconds/p50": step_time,
        "step_time_seconds/p90": step_time * 1.1,
        "step_time_seconds/p99": step_time * 1.3,
        "window/steps_per_second": 1.0 / step_time,
        "window/tokens_per_second": metrics["tokens_per_second"]["mean"]
        if "tokens_per_second" in metrics
        else 1.0,
    }
    return {
        "step": last,
        "rank": rank,
        "t": t_end,
        "stream": "agent",
        "seq": -1,
        "kind": "summary",
        "scope": "window",
        "index": index,
        "run": JOB,
        "first_step": first,
        "last_step": last,
        "t_start": t_end - window_steps / steps_per_s,
        "t_end": t_end,
        "metrics": metrics,
        "derived": derived,
        "host": node,
        "local_rank": local_rank,
        "world_size": world_size,
        "restart": 0,
    }


def accounting_body(
    node: str, first_rank: int, ranks: int, world_size: int, steps: int, metrics: int
) -> dict[str, Any]:
    """The node's per-probe-stream ledgers, one per rank (``StreamLedger.summary()``)."""
    streams = []
    for local in range(ranks):
        records = steps * (1 + metrics // 10)  # the probe's scalar lines, about
        streams.append(
            {
                "stream": f"rank{first_rank + local}-{node}",
                "rank": first_rank + local,
                "local_rank": local,
                "world_size": world_size,
                "host": node,
                "pid": 10_000 + local,
                "restart": 0,
                "sent": records,
                "received": records,
                "dropped": {},
                "not_stored": {},
                "gaps": 0,
                "lost": 0,
                "complete": False,
                "invalid_values": 0,
                "internal_errors": 0,
                "last_step": steps - 1,
            }
        )
    return {"streams": streams}


def node_process(
    endpoint: str,
    first_node: int,
    nodes: int,
    ranks_per_node: int,
    world_size: int,
    steps_per_s: float,
    window_steps: int,
    metrics: int,
    seconds: float,
    ready: Any,
    go: Event,
    start_at: Any,
    results: Any,
) -> None:
    """``nodes`` node agents, one Uplink each, forwarding for ``seconds`` after go."""
    from agent.aggregation.uplink import Uplink

    rng = random.Random(first_node)
    names = metric_names(metrics)
    labels = [f"node-{n:04d}" for n in range(first_node, first_node + nodes)]
    uplinks = [Uplink(endpoint, label, keys_dir=None) for label in labels]
    for uplink in uplinks:
        uplink.start()
    deadline = time.monotonic() + 60
    while not all(u.connected for u in uplinks):
        if time.monotonic() > deadline:
            raise RuntimeError("node uplinks did not connect to the aggregator")
        time.sleep(0.05)
    ready.put(first_node)
    go.wait()
    start = start_at.value
    period = window_steps / steps_per_s
    phases = [rng.uniform(0.0, 1.0 / steps_per_s) for _ in labels]
    # (due time, what, node position, window index or accounting count)
    events: list[tuple[float, str, int, int]] = []
    for i, phase in enumerate(phases):
        events.append((start + period + phase, wire.WINDOW, i, 0))
        events.append((start + phase, wire.ACCOUNTING, i, 0))
    end = start + seconds
    windows = 0
    for uplink, label in zip(uplinks, labels, strict=True):
        uplink.forward(JOB, wire.HELLO, {"host": label, "meta": {"command": ["bench"]}})
    while events:
        events.sort()
        due, what, i, count = events.pop(0)
        if due > end:
            continue
        delay = due - time.time()
        if delay > 0:
            time.sleep(delay)
        node_index = first_node + i
        first_rank = node_index * ranks_per_node
        if what == wire.WINDOW:
            for local in range(ranks_per_node):
                body = window_body(
                    labels[i],
                    first_rank + local,
                    local,
                    world_size,
                    count,
                    window_steps,
                    steps_per_s,
                    names,
                    rng,
                )
                uplinks[i].forward(JOB, wire.WINDOW, body)
                windows += 1
            events.append((due + period, what, i, count + 1))
        else:
            steps = int((time.time() - start) * steps_per_s) + 1
            body = accounting_body(
                labels[i], first_rank, ranks_per_node, world_size, steps, metrics
            )
            uplinks[i].forward(JOB, wire.ACCOUNTING, body)
            events.append((due + ACCOUNTING_SECONDS, what, i, count + 1))
    stats = []
    for uplink in uplinks:
        uplink.close(10.0)
        job = uplink.stats()["jobs"].get(JOB, {})
        stats.append((uplink.node, job.get("produced", 0), job.get("dropped", {})))
    results.put((windows, stats))


# -- the aggregator --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_aggregator(
    bind: str, runs_dir: Path, log_path: Path, sinks: str
) -> subprocess.Popen[bytes]:
    """A real ``outrider aggregator``, returned once it says it is bound."""
    read_fd, write_fd = os.pipe()
    command = [
        *OUTRIDER,
        "aggregator",
        "--bind",
        bind,
        "--runs-dir",
        str(runs_dir),
        "--sinks",
        sinks,
        "--ready-fd",
        str(write_fd),
        "--log-level",
        "WARNING",
    ]
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(runs_dir))
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(command, pass_fds=(write_fd,), stdout=log, stderr=log, env=env)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = ready.readline()
    if line.strip() != b"ready":
        proc.kill()
        raise RuntimeError(f"the aggregator did not start:\n{log_path.read_text()[-2000:]}")
    return proc


class Tail(threading.Thread):
    """Reads the job's metrics.jsonl as it grows: each window line's delay after its t_end."""

    def __init__(self, path: Path, poll: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.poll = poll
        self.delays: list[tuple[float, float]] = []  # (t_end, seen - t_end)
        self.judged = 0  # job windows judged (their job/... scalars line)
        self._halt = threading.Event()

    def run(self) -> None:
        handle = None
        tail = b""
        try:
            while not self._halt.is_set():
                if handle is None:
                    try:
                        handle = open(self.path, "rb")  # noqa: SIM115 - closed below
                    except FileNotFoundError:
                        time.sleep(self.poll)
                        continue
                chunk = handle.read()
                seen = time.time()
                if chunk:
                    *lines, tail = (tail + chunk).split(b"\n")
                    for line in lines:
                        if b'"scope":"window"' in line:
                            match = _T_END.search(line)
                            if match:
                                t_end = float(match.group(1))
                                self.delays.append((t_end, seen - t_end))
                        elif b'"job/ranks_reporting"' in line:
                            self.judged += 1
                else:
                    self._halt.wait(self.poll)
        finally:
            if handle is not None:
                handle.close()

    def stop(self) -> None:
        self._halt.set()
        self.join()


def tree_cpu(proc: psutil.Process) -> float:
    total = 0.0
    for member in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += sum(member.cpu_times()[:2])
    return total


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for member in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


def read_view(run_json: Path) -> dict[str, Any]:
    try:
        return orjson.loads(run_json.read_bytes())  # type: ignore[no-any-return]
    except (OSError, orjson.JSONDecodeError):
        return {}


def received(view: dict[str, Any]) -> int:
    nodes = (view.get("job") or {}).get("nodes") or {}
    return sum(int((node.get("uplink") or {}).get("received", 0)) for node in nodes.values())


def run_size(tmp: Path, ranks: int, args: argparse.Namespace) -> dict[str, Any]:
    """One aggregator, ``ranks`` ranks over nodes of ``args.ranks_per_node``; figures."""
    nodes = math.ceil(ranks / args.ranks_per_node)
    world_size = nodes * args.ranks_per_node
    work = tmp / f"ranks-{ranks}"
    runs_dir = work / "jobs"
    runs_dir.mkdir(parents=True)
    bind = f"127.0.0.1:{free_port()}"
    aggregator = start_aggregator(bind, runs_dir, work / "aggregator.log", args.sinks)
    proc = psutil.Process(aggregator.pid)
    period = args.window_steps / args.steps_per_second
    warmup = period + 2.0
    total = warmup + args.seconds
    context = mp.get_context("spawn")
    ready, go, results = context.Queue(), context.Event(), context.Queue()
    start_at = context.Value("d", 0.0)
    processes = min(args.node_processes, nodes)
    shares = [nodes // processes + (1 if p < nodes % processes else 0) for p in range(processes)]
    firsts = [sum(shares[:p]) for p in range(processes)]
    senders = [
        context.Process(
            target=node_process,
            args=(
                f"tcp://{bind}",
                first,
                share,
                args.ranks_per_node,
                world_size,
                args.steps_per_second,
                args.window_steps,
                args.metrics,
                total,
                ready,
                go,
                start_at,
                results,
            ),
        )
        for first, share in zip(firsts, shares, strict=True)
    ]
    job_dir = runs_dir / JOB
    tail = Tail(job_dir / "metrics.jsonl")
    peak_rss = 0
    node_stats: list[tuple[str, int, dict[str, int]]] = []
    windows_sent = 0
    try:
        for sender in senders:
            sender.start()
        deadline = time.monotonic() + 120
        for _ in senders:
            while True:
                with contextlib.suppress(Exception):
                    ready.get(timeout=0.2)
                    break
                if any(s.exitcode not in (None, 0) for s in senders):
                    raise RuntimeError("a node process died during set-up")
                if time.monotonic() > deadline:
                    raise RuntimeError("node processes did not connect in time")
        tail.start()
        start_at.value = time.time() + 0.5
        go.set()
        time.sleep(max(0.0, start_at.value + warmup - time.time()))
        cpu0, parts0, wall0 = tree_cpu(proc), agent_cpu_by_part(proc.pid), time.monotonic()
        got0 = received(read_view(job_dir / "run.json"))
        while time.monotonic() < wall0 + args.seconds:
            peak_rss = max(peak_rss, tree_rss(proc))
            time.sleep(0.25)
        cpu1, parts1, wall1 = tree_cpu(proc), agent_cpu_by_part(proc.pid), time.monotonic()
        got1 = received(read_view(job_dir / "run.json"))
        for _ in senders:
            sent, stats = results.get(timeout=total + 60)
            windows_sent += sent
            node_stats.extend(stats)
        for sender in senders:
            sender.join(30)
        # every node said bye: wait for run.json to show each uplink complete
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            nodes_view = (read_view(job_dir / "run.json").get("job") or {}).get("nodes") or {}
            if len(nodes_view) == nodes and all(n.get("complete") for n in nodes_view.values()):
                break
            time.sleep(0.2)
    finally:
        for sender in senders:
            if sender.is_alive():
                sender.kill()
        if aggregator.poll() is None:
            aggregator.send_signal(signal.SIGTERM)
            try:
                aggregator.wait(60)
            except subprocess.TimeoutExpired:
                aggregator.kill()
                aggregator.wait()
        if tail.is_alive():
            tail.stop()
    final = read_view(job_dir / "run.json")
    seconds = wall1 - wall0
    delays = sorted(delay for t_end, delay in tail.delays)
    uplinks = [
        (name, node.get("uplink") or {})
        for name, node in ((final.get("job") or {}).get("nodes") or {}).items()
    ]
    balanced = sum(
        1
        for _, u in uplinks
        if u.get("sent") == u.get("received", 0) + u.get("dropped", 0) + u.get("lost", 0)
    )
    produced = {name: count for name, count, _ in node_stats}
    agrees = sum(1 for name, u in uplinks if produced.get(name) == u.get("sent"))
    parts = {name: parts1.get(name, 0.0) - parts0.get(name, 0.0) for name in parts1}
    shutil.rmtree(work, ignore_errors=True)
    cores = (cpu1 - cpu0) / seconds
    return {
        "ranks": world_size,
        "nodes": nodes,
        "processes": processes,
        "cores": cores,
        "items_per_s": (got1 - got0) / seconds,
        "bytes": (final.get("agent") or {}).get("bytes", 0),
        "wall": total,
        "peak_rss_mb": peak_rss / 2**20,
        "p50": percentile(delays, 50),
        "p99": percentile(delays, 99),
        "max": delays[-1] if delays else math.nan,
        "windows": len(delays),
        "windows_expected": windows_sent,
        "judged": tail.judged,
        "balanced": balanced,
        "agrees": agrees,
        "uplinks": len(uplinks),
        "lost": sum(int(u.get("lost", 0)) for _, u in uplinks),
        "dropped": sum(int(u.get("dropped", 0)) for _, u in uplinks),
        "main_share": parts.get("receive loop", 0.0) / max(cpu1 - cpu0, 1e-9),
    }


def fit(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """Least squares cores = fixed + per_rank * ranks over the measured sizes."""
    xs = [float(r["ranks"]) for r in rows]
    ys = [float(r["cores"]) for r in rows]
    if len(rows) < 2:
        return 0.0, ys[0] / xs[0]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - slope * mx, slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", default="64,256,1024", help="comma-separated job sizes")
    parser.add_argument("--ranks-per-node", type=int, default=8)
    parser.add_argument("--steps-per-second", type=float, default=10.0)
    parser.add_argument("--metrics", type=int, default=100, help="metrics per rank")
    parser.add_argument(
        "--window-steps", type=int, default=100, help="steps per window (the node's default 100)"
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time per size")
    parser.add_argument(
        "--node-processes", type=int, default=4, help="sender processes the nodes share"
    )
    parser.add_argument("--sinks", default="none", help="the aggregator's --sinks")
    parser.add_argument("--quick", action="store_true", help="64 and 256 ranks, 25 s each")
    args = parser.parse_args()
    if args.quick:
        args.ranks, args.seconds = "64,256", 25.0
    sizes = [int(size) for size in args.ranks.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="outrider-bench-agg-"))
    load_before = load_average()
    rows = []
    try:
        for size in sizes:
            rows.append(run_size(tmp, size, args))
            print(f"{size} ranks done", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report(rows, args, (load_before, load_average()))


def report(rows: list[dict[str, Any]], args: argparse.Namespace, load: tuple[float, float]) -> None:
    period = args.window_steps / args.steps_per_second
    print("\nbench_aggregator: one job aggregator fed by simulated node agents (loopback TCP)")
    print(f"machine: {machine()}; 1-min load average {load[0]:.1f} -> {load[1]:.1f}")
    print(
        f"{args.ranks_per_node} ranks per node, {args.steps_per_second:g} steps/s, "
        f"{args.metrics} metrics per rank, window {args.window_steps} steps (one window item "
        f"per rank every {period:g} s), accounting every {ACCOUNTING_SECONDS:g} s, sinks "
        f"{args.sinks}; {args.seconds:g} s measured after {period + 2:g} s of warm-up"
    )
    table = []
    for r in rows:
        per_rank_ms = r["cores"] / r["ranks"] * 1000
        table.append(
            [
                f"{r['ranks']}",
                f"{r['nodes']}/{r['processes']}",
                f"{r['items_per_s']:,.1f}",
                f"{r['bytes'] / r['wall'] / 1e6:.2f}",
                f"{r['cores']:.3f}",
                f"{per_rank_ms:.3f}",
                f"{1 / per_rank_ms * 1000:,.0f}" if per_rank_ms > 0 else "-",
                f"{r['main_share']:.0%}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['p50']:.3f}",
                f"{r['p99']:.3f}",
                f"{r['max']:.3f}",
                f"{r['windows']}/{r['windows_expected']}",
                f"{r['judged']}",
                f"{r['balanced']}/{r['uplinks']}",
                f"{r['lost']}",
            ]
        )
    print()
    print_table(
        [
            "ranks",
            "nodes/procs",
            "items/s",
            "MB/s in",
            "agg cores",
            "core-ms/rank-s",
            "ranks/core",
            "main thr",
            "RSS MB",
            "lat p50 s",
            "p99 s",
            "max s",
            "windows seen",
            "judged",
            "ledgers ok",
            "lost",
        ],
        table,
    )
    fixed, per_rank = fit(rows)
    print(
        f"\nfit over the sizes: aggregator cores = {fixed:.3f} + {per_rank * 1000:.4f} ms/s "
        f"x ranks -> {TARGET_RANKS:,} ranks need {fixed + per_rank * TARGET_RANKS:.2f} cores "
        f"(largest size alone, per rank: "
        f"{rows[-1]['cores'] / rows[-1]['ranks'] * TARGET_RANKS:.2f} cores)"
    )
    print(
        f"budget: >= {BUDGET_RANKS_PER_CORE:,} ranks per aggregator core at 10 steps/s; "
        f"rank -> job view p99 <= {BUDGET_LATENCY_P99_S:g} s"
    )
    print(
        "latency: from the node's forward of a window (its t_end) to the line read in the "
        "job's metrics.jsonl (10 ms polls); 'ledgers ok': nodes whose uplink sent == "
        "received + dropped + lost in run.json; MB/s in: the aggregator's received bytes "
        "over the whole run"
    )
    disagree = [r for r in rows if r["agrees"] != r["uplinks"]]
    if disagree:
        print("note: some nodes' produced counts differ from the aggregator's sent (see above)")


if __name__ == "__main__":
    main()
