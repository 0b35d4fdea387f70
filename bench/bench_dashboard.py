"""Agent ingest with the live dashboard off, on with no page open, and on with 5 pages open.

Why: the dashboard must never slow the receive loop. It runs in a process of its own
(niced below the agent) and reads the run store from disk, so what it can take from the
agent is CPU time on a shared machine and page-cache reads. This measures that: the same
end-to-end ingest as bench_ingest.py (one sender process pushing pre-packed messages of
512 ``scalars`` records x 10 metrics over ipc to a real ``outrider agent``, timed until
metrics.jsonl holds every line), under three conditions, interleaved round by round:

* ``dashboard off``: ``--dashboard off``;
* ``dashboard, 0 pages``: the dashboard process serving, nobody looking;
* ``dashboard, 5 pages``: 5 clients that behave like open run pages: each holds the
  run's server-sent event stream and, on every ``grown`` event, fetches the run's
  facts and the nine charts' series, as ``static/app.js`` does.

The table gives the median of the rounds: stored values/s, the agent's CPU seconds, the
dashboard process's CPU seconds, and how many page refreshes the 5 pages made.

Then the live latency: a real agent with its dashboard, a run page open in a real browser
(Playwright, Debian's chromium, headless), and ``probe.log`` of one step a second from
this process: the time from the ``probe.log`` call until the page's loss chart holds the
new point (skipped without chromium).

Then a run of a million steps (5 metrics a step, written as the agent stores them): how
long ``outrider dashboard`` takes to answer a run page's first chart request (the whole
run read once), a later one, and a zoomed one, and how many points each answer holds.

    python bench/bench_dashboard.py            # 3 rounds, ~1.5 min
    python bench/bench_dashboard.py --quick    # 1 round
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil
from _common import (
    SCALAR_NAMES,
    load_average,
    machine,
    print_table,
    short_ipc_endpoint,
    start_agent,
    stop_agent,
    wait_for_lines,
)
from bench_ingest import sender_process, wait_ready

from probe import protocol

PAGES = 5
#: the chart requests a run page makes on each refresh (static/app.js RUN_CHARTS)
CHARTS = (
    ["loss", "val/loss", "train/loss"],
    ["lr", "lr/*", "learning_rate"],
    ["grad_norm", "grad_norm/*"],
    ["tokens_per_second", "samples_per_second", "steps_per_second", "window/*_per_second"],
    ["step_time_seconds", "step_time_seconds/p50", "step_time_seconds/p90"],
    ["system/cpu_percent", "system/gpu*util*"],
    ["system/memory_used_bytes", "cuda_memory_allocated_bytes"],
    ["features/*/effective_rank"],
    ["features/*/mean_pairwise_cosine", "features/*/collapse_ratio"],
)
CHROMIUM = Path("/usr/bin/chromium")
CONDITIONS = ("dashboard off", "dashboard, 0 pages", f"dashboard, {PAGES} pages")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Page(threading.Thread):
    """One open run page: the event stream, and a full refresh on every ``grown`` event."""

    def __init__(self, base: str, run: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.base, self.run_id, self.stop = base, run, stop
        self.refreshes = 0
        self.errors = 0

    def get(self, path: str, **params: Any) -> bytes:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.base}{path}?{query}", timeout=30) as response:
            body: bytes = response.read()
            return body

    def refresh(self) -> None:
        self.get("/api/run", run=self.run_id)
        for names in CHARTS:
            self.get("/api/series", run=self.run_id, names=names, buckets=600)
        self.refreshes += 1

    def run_once(self) -> None:
        url = f"{self.base}/api/events?run={self.run_id}"
        with urllib.request.urlopen(url, timeout=30) as events:
            while not self.stop.is_set():
                line = events.readline()
                if not line:
                    return
                if line.startswith(b"event: grown"):
                    self.refresh()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.run_once()
            except (OSError, urllib.error.URLError):
                self.errors += 1  # the run does not exist until its first record is stored
                time.sleep(0.05)


def one_round(tmp: Path, condition: str, records: int) -> dict[str, float]:
    work = Path(tempfile.mkdtemp(dir=tmp))
    runs_dir = work / "runs"
    endpoint = short_ipc_endpoint(tmp)
    port = free_port()
    board = "off" if condition == "dashboard off" else f"127.0.0.1:{port}"
    agent = start_agent(
        endpoint, runs_dir, work / "agent.log", options=("--sinks", "none", "--dashboard", board)
    )
    process = psutil.Process(agent.pid)
    stop = threading.Event()
    pages: list[Page] = []
    context = mp.get_context("spawn")
    ready, go, results = context.Queue(), context.Event(), context.Queue()
    sender = context.Process(
        target=sender_process,
        args=(endpoint, "ingest", "sender0", records, 0, protocol.VERSION, ready, go, results),
    )
    try:
        board_process = _child(process) if board != "off" else None
        if condition == CONDITIONS[2]:
            pages = [Page(f"http://127.0.0.1:{port}", "ingest", stop) for _ in range(PAGES)]
            for page in pages:
                page.start()
        sender.start()
        wait_ready(ready, [sender])
        agent_cpu0 = _cpu(process)
        board_cpu0 = _cpu(board_process)
        t0 = time.perf_counter()
        go.set()
        done = wait_for_lines(runs_dir / "ingest" / "metrics.jsonl", records, timeout=300)
        if done is None:
            raise RuntimeError(f"the agent did not store {records} lines in time")
        agent_cpu = _cpu(process) - agent_cpu0
        board_cpu = _cpu(board_process) - board_cpu0
        sender.join(60)
    finally:
        stop.set()
        if sender.is_alive():
            sender.kill()
        stop_agent(agent)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "values_per_s": records * len(SCALAR_NAMES) / (done - t0),
        "agent_cpu_s": agent_cpu,
        "dashboard_cpu_s": board_cpu,
        "refreshes": float(sum(page.refreshes for page in pages)),
    }


def _child(agent: psutil.Process, timeout: float = 10.0) -> psutil.Process:
    """The dashboard process the agent started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in agent.children():
            if "agent.dashboard" in " ".join(child.cmdline()):
                return child
        time.sleep(0.05)
    raise RuntimeError("the agent started no dashboard process")


def _cpu(process: psutil.Process | None) -> float:
    if process is None:
        return 0.0
    times = process.cpu_times()
    return float(times.user + times.system)


def long_run(tmp: Path, steps: int) -> list[list[str]]:
    """First, warm and zoomed chart answers over a run of ``steps`` steps."""
    run = tmp / "long" / "runs" / "long"
    run.mkdir(parents=True)
    (run / "run.json").write_bytes(orjson.dumps({"run_id": "long", "status": "running"}))
    with open(run / "metrics.jsonl", "wb") as lines:
        for step in range(steps):
            loss = 50.0 if step == steps // 3 else 2.0 + math.sin(step / 1000) * 0.1
            metrics = {
                "loss": loss,
                "lr": 1e-3,
                "grad_norm": 1.0,
                "tokens_per_second": 1e5,
                "step_time_seconds": 0.1,
            }
            entry = {
                "kind": "scalars",
                "step": step,
                "rank": 0,
                "t": 1e9 + step,
                "metrics": metrics,
            }
            lines.write(orjson.dumps(entry) + b"\n")
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-P",
            "-m",
            "agent",
            "dashboard",
            "--runs-dir",
            str(run.parent),
            "--bind",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/api/series?run=long&names=loss&buckets=600"
    rows = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/runs", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for label, url in (
            ("first chart request (reads the run)", base),
            ("next chart request", base),
            ("zoomed to 1,000 steps", f"{base}&lo={steps // 3 - 500}&hi={steps // 3 + 500}"),
        ):
            t0 = time.perf_counter()
            with urllib.request.urlopen(url, timeout=300) as response:
                body = orjson.loads(response.read())
            seconds = time.perf_counter() - t0
            loss = body["series"]["loss"]
            spike = "yes" if 50.0 in loss["y"] else "no"
            rows.append([label, f"{seconds * 1000:,.0f} ms", f"{len(loss['x']):,}", spike])
        rss = psutil.Process(server.pid).memory_info().rss / 2**20
        rows.append(["dashboard RSS after reading it", f"{rss:,.0f} MiB", "", ""])
    finally:
        server.terminate()
        server.wait(10)
    return rows


def live_latency(tmp: Path, samples: int) -> list[float]:
    """Seconds from ``probe.log`` to the point drawn in an open run page, ``samples`` times."""
    from playwright.sync_api import sync_playwright

    import probe

    work = Path(tempfile.mkdtemp(dir=tmp))
    endpoint = short_ipc_endpoint(tmp)
    port = free_port()
    agent = start_agent(
        endpoint,
        work / "runs",
        work / "agent.log",
        options=("--sinks", "none", "--dashboard", f"127.0.0.1:{port}"),
    )
    seconds = []
    try:
        probe.init(endpoint, run_id="live")
        probe.log({"loss": 1.0}, step=0)
        probe.flush(10)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
            page = browser.new_page()
            deadline = time.monotonic() + 30
            while True:
                try:
                    page.goto(f"http://127.0.0.1:{port}/run?id=live")
                    page.wait_for_function("window.outrider.charts.loss.points === 1", timeout=5000)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
            for step in range(1, samples + 1):
                time.sleep(1.0)
                t0 = time.perf_counter()
                probe.log({"loss": 1.0 / step}, step=step)
                page.wait_for_function(
                    f"window.outrider.charts.loss.points === {step + 1}", polling="raf"
                )
                seconds.append(time.perf_counter() - t0)
            browser.close()
        probe.finish(5)
    finally:
        stop_agent(agent)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=500_000, help="records per round")
    parser.add_argument("--long-steps", type=int, default=1_000_000, help="steps of the long run")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    print(machine(), f"load {load_average()}", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="bdash-"))
    figures: dict[str, list[dict[str, float]]] = {condition: [] for condition in CONDITIONS}
    try:
        latency = live_latency(tmp, 10 if args.quick else 20) if CHROMIUM.exists() else []
        long_rows = long_run(tmp, args.long_steps)
        one_round(tmp, CONDITIONS[0], args.records // 10)  # warm-up (imports, page cache)
        for index in range(rounds):
            order = CONDITIONS[index % 3 :] + CONDITIONS[: index % 3]
            for condition in order:
                figures[condition].append(one_round(tmp, condition, args.records))
                print(f"round {index + 1}/{rounds}: {condition} done", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = statistics.median(f["values_per_s"] for f in figures[CONDITIONS[0]])
    rows = []
    for condition in CONDITIONS:
        runs = figures[condition]

        def median(key: str, runs: list[dict[str, float]] = runs) -> float:
            return statistics.median(f[key] for f in runs)

        rows.append(
            [
                condition,
                f"{median('values_per_s'):,.0f}",
                f"{median('values_per_s') / base:.2f}",
                f"{median('agent_cpu_s'):.2f}",
                f"{median('dashboard_cpu_s'):.2f}",
                f"{median('refreshes'):.0f}",
            ]
        )
    print(
        f"\n{args.records:,} records x {len(SCALAR_NAMES)} values per round, "
        f"median of {rounds} round(s), conditions interleaved (order rotated)"
    )
    print_table(
        ["condition", "values/s", "vs off", "agent CPU s", "dashboard CPU s", "page refreshes"],
        rows,
    )
    if latency:
        ordered = sorted(latency)
        print(
            f"\nprobe.log -> point drawn in an open run page (chromium), {len(ordered)} records "
            f"a second apart: median {statistics.median(ordered) * 1000:.0f} ms, "
            f"max {ordered[-1] * 1000:.0f} ms"
        )
    print(f"\na run of {args.long_steps:,} steps x 5 metrics, served by `outrider dashboard`")
    print_table(["request", "time", "points", "spike kept"], long_rows)


if __name__ == "__main__":
    main()
