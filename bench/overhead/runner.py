"""One variant's run: its agent (for the outrider kinds), the worker process, and the
agent's accounting of what the trainer sent.

Every run gets a fresh working directory, agent and worker process; the worker
is ``bench_overhead.py --worker`` with the options of the parent run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import (
    DEFAULT_SINKS_CONFIG,
    LIVE_WANDB_SINKS_CONFIG,
    ROOT,
    short_ipc_endpoint,
    start_run_agent,
    stop_agent,
    stream_accounting,
)

from overhead.counters import agent_cpu_s
from overhead.placement import AGENT_CPU

COMMAND = ROOT / "bench" / "bench_overhead.py"

#: the parent's options that a worker needs, by their argparse names
WORKER_OPTIONS = (
    "steps",
    "warmup",
    "hist_every",
    "rank_every",
    "text_every",
    "layer_every",
    "flush_interval",
    "busy_flush_interval",
    "seed",
    "batch_size",
    "context",
    "layers",
    "d_model",
    "heads",
    "lr",
    "data_bytes",
    "start",
)


@dataclass
class Run:
    """One variant's run in one repeat."""

    loop_s: float
    step_times: list[float]
    result: dict[str, Any]
    agent: dict[str, Any] = field(default_factory=dict)


def worker_command(kind: str, placement: str, workdir: Path, args: argparse.Namespace) -> list[str]:
    command = [
        sys.executable,
        str(COMMAND),
        "--worker",
        "--kind",
        kind,
        "--placement",
        placement,
        "--result",
        str(workdir / "result.json"),
        "--workdir",
        str(workdir),
    ]
    for name in WORKER_OPTIONS:
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return command


def run_variant(variant: str, args: argparse.Namespace, tmp: Path, index: int) -> Run:
    """Run ``variant`` once under ``tmp``; ``index`` numbers the run across the whole bench."""
    kind, placement = variant.split(":")
    workdir = Path(tempfile.mkdtemp(prefix=f"{index:03d}-", dir=tmp))
    result_path = workdir / "result.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    command = worker_command(kind, placement, workdir, args)
    agent = None
    run_id = f"bench-overhead-{index:03d}"
    runs_dir = workdir / "runs"
    if kind.startswith("outrider"):
        endpoint = short_ipc_endpoint(tmp)
        agent = start_run_agent(
            endpoint,
            runs_dir,
            run_id,
            workdir,
            sinks=kind.startswith("outrider+sinks"),
            config_text=LIVE_WANDB_SINKS_CONFIG
            if kind == "outrider+sinks-live"
            else DEFAULT_SINKS_CONFIG,
            cpus={AGENT_CPU} if placement == "sep" else None,
        )
        command += ["--endpoint", endpoint, "--run-id", run_id, "--agent-pid", str(agent.pid)]
    else:
        env["OUTRIDER_DISABLED"] = "1"
    agent_info: dict[str, Any] = {}
    try:
        cpu_before = agent_cpu_s(agent.pid) if agent else 0.0
        started = time.perf_counter()
        proc = subprocess.run(
            command, env=env, cwd=workdir, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not result_path.exists():
            raise RuntimeError(
                f"{variant} worker failed ({proc.returncode}):\n"
                f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
            )
        if agent is not None:
            agent_info["cpu_share"] = (agent_cpu_s(agent.pid) - cpu_before) / (
                time.perf_counter() - started
            )
            started = time.perf_counter()
            stop_agent(agent)
            agent_info["stop_s"] = time.perf_counter() - started
            agent_info["accounting"] = stream_accounting(runs_dir / run_id)
    finally:
        if agent is not None:
            stop_agent(agent)
    result = json.loads(result_path.read_text())
    shutil.rmtree(workdir, ignore_errors=True)
    return Run(result["loop_s"], result["step_times"], result, agent_info)
