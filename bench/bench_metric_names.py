"""A trainer that logs a million distinct metric names: the agent's memory and what it keeps.

Why: a metric name built from a step, a sample id or a token (``loss/sample_81723``) is
a common mistake, and every name the agent tracks in memory (statistics, alert rules,
sink series) costs it memory for the rest of the run. The agent keeps every value in the
run store, but tracks at most ``max_metric_names`` names per run in memory
(docs/protocol.md), counts the values it holds back and raises ``too_many_metrics``.

A real probe in this process logs ``--names`` distinct names (``--per-step`` names a
step, plus a ``loss``) to a real ``outrider agent`` with TensorBoard and Prometheus on
and its statistics and alerts on. Printed: the agent's RSS (its whole tree) before, at
its peak and after; how many values were stored and how many distinct names reached
metrics.jsonl; the agent's cap figures from run.json and the alerts it raised.

    python bench/bench_metric_names.py                     # 1,000,000 names
    python bench/bench_metric_names.py --names 200000      # a quick look
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from _common import (
    agent_tree,
    machine,
    print_table,
    short_ipc_endpoint,
    start_run_agent,
    stop_agent,
)

MB = 1024 * 1024
CONFIG = """\
stats:
  dashboard_seconds: 0
sinks:
  tensorboard:
    enabled: true
  prometheus:
    enabled: true
    port: 0
  wandb:
    enabled: false
"""


class PeakRss:
    """The agent tree's RSS, sampled on a thread of this process; the peak kept."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        import psutil

        self.agent = psutil.Process(pid)
        self.every = every
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def now(self) -> float:
        import psutil

        total = 0.0
        for process in agent_tree(self.agent):
            with contextlib.suppress(psutil.Error):
                total += process.memory_info().rss / MB
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def train(names: int, per_step: int) -> int:
    """Log ``names`` distinct names, ``per_step`` a step; returns the steps taken."""
    import probe

    step = 0
    for start in range(0, names, per_step):
        probe.log({f"sample_{i}/loss": 1.0 / (i + 1) for i in range(start, start + per_step)}, step)
        probe.log({"loss": 1.0 / (step + 1)}, step=step)
        step += 1
        if step % 20 == 0:
            probe.flush(30.0)  # keep the queue short: this bench is about the agent
    return step


def stored(run_dir: Path) -> tuple[int, int, int]:
    """(scalar lines, values, distinct names) of the trainer's records in metrics.jsonl."""
    lines = values = 0
    names: set[str] = set()
    with open(run_dir / "metrics.jsonl", "rb") as metrics:
        for line in metrics:
            entry = orjson.loads(line)
            if entry.get("stream") == "agent" or entry.get("kind") != "scalars":
                continue
            lines += 1
            values += len(entry["metrics"])
            names.update(entry["metrics"])
    return lines, values, len(names)


def alerts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "alerts.jsonl"
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--names", type=int, default=1_000_000, help="distinct names to log")
    parser.add_argument("--per-step", type=int, default=1000, help="names per step (<= 1024)")
    parser.add_argument(
        "--config", type=Path, default=None, help="an agent config file instead of the one above"
    )
    args = parser.parse_args()
    if not 0 < args.per_step <= 1024 or args.names < args.per_step:
        parser.error("--per-step must be 1..1024 and at most --names")
    print(f"machine: {machine()}")
    print(f"{args.names:,} distinct names, {args.per_step} a step; TensorBoard + Prometheus")
    import probe

    with tempfile.TemporaryDirectory(prefix="bmn-", dir="/tmp") as tmp_name:
        tmp = Path(tmp_name)
        workdir = tmp / "work"
        workdir.mkdir()
        endpoint = short_ipc_endpoint(tmp)
        run_dir = workdir / "runs" / "names"
        agent = start_run_agent(
            endpoint,
            workdir / "runs",
            "names",
            workdir,
            sinks=True,
            cpus=None,
            config_text=args.config.read_text() if args.config else CONFIG,
        )
        try:
            with PeakRss(agent.pid) as rss:
                time.sleep(2.0)  # the agent's start-up work settles
                before = rss.now()
                probe.init(endpoint=endpoint, run_id="names")
                started = time.perf_counter()
                steps = train(args.names, args.per_step)
                probe.finish(60.0)
                seconds = time.perf_counter() - started
                time.sleep(3.0)  # the sinks and the analysis catch up
                after = rss.now()
        finally:
            stop_agent(agent, timeout=120.0)
        lines, values, names = stored(run_dir)
        info = orjson.loads((run_dir / "run.json").read_bytes())
        print_table(
            ["agent tree RSS", "MB"],
            [["before", f"{before:.0f}"], ["peak", f"{rss.peak:.0f}"], ["after", f"{after:.0f}"]],
        )
        print(f"\n{steps} steps in {seconds:.1f} s; probe: {probe.stats()}")
        print(f"stored: {lines:,} scalars lines, {values:,} values, {names:,} distinct names")
        print(f"run.json metric_names: {info.get('metric_names')}")
        print(f"accounting: {[s for s in info['streams'] if s['rank'] >= 0]}")
        agent_info = info.get("agent", {})
        for sink, health in agent_info.get("sinks", {}).items():
            print(f"sink {sink}: {health.get('health')}, {health.get('sink')}")
        print(f"agent rejected: {agent_info.get('rejected_records')}")
        print(f"alerts: {[(a.get('name'), a.get('message')) for a in alerts(run_dir)]}")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
