"""Run scenarios as real trainers under real agents, and read back what the agent said.

Each scenario is one ``outrider run --config cfg.yaml --sinks none -- python -P
-m bench.failures.trainers ...`` in its own directory; afterwards the run's
``alerts.jsonl`` gives every alert and ``metrics.jsonl`` the step each one
belongs to (an alert without a step, e.g. ``stalled`` or ``memory_leak``, is
placed at the last train step stored before it) and the onset's
``failure_injected`` event.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.failures.scenarios import AGENT_CONFIG, STALL_SECONDS, STEP_SECONDS, Scenario

ROOT = Path(__file__).resolve().parent.parent.parent
SEVERE = ("warning", "error", "critical")


@dataclass
class Alert:
    name: str
    severity: str
    step: int | None  # the alert's own step, else the last train step stored before it
    t: float
    message: str
    timed: bool = False  # the alert had no step: ``step`` comes from its time

    def after(self, onset_step: int, onset_t: float | None) -> bool:
        """At or after the onset: by time for alerts without a step of their own (a
        trainer that hangs or dies at the onset logs no step after it)."""
        if self.timed and onset_t is not None:
            return self.t >= onset_t
        return self.step is not None and self.step >= onset_step


@dataclass
class RunResult:
    scenario: Scenario
    exit_status: int | None
    wall_seconds: float
    onset_step: int | None = None
    onset_t: float | None = None
    last_step: int | None = None
    alerts: list[Alert] = field(default_factory=list)
    accounting: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    #: the first step after the onset where the loss's rolling median (15 steps) is twice
    #: its lowest so far: what "within N steps of the loss doubling" is measured from
    doubled_step: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.as_dict(),
            "exit_status": self.exit_status,
            "wall_seconds": round(self.wall_seconds, 1),
            "onset_step": self.onset_step,
            "doubled_step": self.doubled_step,
            "onset_t": self.onset_t,
            "last_step": self.last_step,
            "alerts": [vars(alert) for alert in self.alerts],
            "accounting": self.accounting,
            "error": self.error,
        }


def timeout_for(scenario: Scenario) -> float:
    """Generous: pacing, a stall, model and agent start-up, the agent's drain."""
    return (
        scenario.steps * STEP_SECONDS * 4
        + (STALL_SECONDS if scenario.failure == "stall" else 0)
        + 120
    )


def command(scenario: Scenario, config: Path, runs_dir: Path) -> list[str]:
    """``outrider run`` as the console script runs it, with the suite's trainer."""
    return [
        sys.executable,
        "-P",
        "-m",
        "agent",
        "run",
        "--config",
        str(config),
        "--sinks",
        "none",
        "--runs-dir",
        str(runs_dir),
        "--run-id",
        scenario.name,
        "-q",
        "--",
        sys.executable,
        "-P",
        "-m",
        "bench.failures.trainers",
        *scenario.trainer_args(),
    ]


def run_scenario(scenario: Scenario, workdir: Path) -> RunResult:
    """One scenario in ``workdir/<name>``: trainer and agent logs stay there."""
    home = workdir / scenario.name
    home.mkdir(parents=True, exist_ok=True)
    config = home / "agent.yaml"
    config.write_text(AGENT_CONFIG)
    runs_dir = home / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.monotonic()
    with open(home / "output.log", "wb") as log:
        try:
            process = subprocess.run(
                command(scenario, config, runs_dir),
                cwd=home,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout_for(scenario),
                check=False,
            )
            status: int | None = process.returncode
            error = None
        except subprocess.TimeoutExpired:
            status, error = None, f"timed out after {timeout_for(scenario):.0f} s"
    result = RunResult(scenario, status, time.monotonic() - started, error=error)
    read_run(result, runs_dir / scenario.name)
    return result


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_bytes().splitlines():
        try:
            entries.append(json.loads(line))
        except ValueError:
            continue  # a line cut short
    return entries


def doubling_step(losses: Sequence[tuple[int, Any]], onset: int | None) -> int | None:
    """The first step at or after ``onset`` where the rolling median of 15 losses is twice
    the lowest median so far; None if it never is (or there is no onset)."""
    if onset is None:
        return None
    window: list[float] = []
    lowest = math.inf
    for step, value in losses:
        if not isinstance(value, int | float) or not math.isfinite(value):
            continue
        window = [*window[-14:], float(value)]
        if len(window) < 15:
            continue
        median = statistics.median(window)
        lowest = min(lowest, median)
        if step >= onset and lowest > 0 and median >= 2 * lowest:
            return step
    return None


def read_run(result: RunResult, run_dir: Path) -> None:
    """Fill ``result`` from the run's store: onset, last step, alerts with their steps."""
    trainer_steps: list[tuple[float, int]] = []
    losses: list[tuple[int, Any]] = []
    for entry in _jsonl(run_dir / "metrics.jsonl"):
        if entry.get("stream") == "agent" or entry.get("step") is None:
            continue
        if entry.get("kind") == "scalars" and "loss" in entry.get("metrics", {}):
            trainer_steps.append((entry["t"], entry["step"]))
            losses.append((entry["step"], entry["metrics"]["loss"]))
        elif entry.get("kind") == "event" and entry.get("name") == "failure_injected":
            result.onset_step, result.onset_t = entry["step"], entry["t"]
    trainer_steps.sort()
    if result.onset_step is None and not result.scenario.healthy:
        result.onset_step = result.scenario.onset  # the event was lost (a killed trainer)
        result.onset_t = next((t for t, s in trainer_steps if s >= result.scenario.onset), None)
    result.last_step = max((s for _, s in trainer_steps), default=None)
    result.doubled_step = doubling_step(sorted(losses), result.onset_step)
    for entry in _jsonl(run_dir / "alerts.jsonl"):
        step, timed = entry.get("step"), entry.get("step") is None
        if timed:
            step = max((s for t, s in trainer_steps if t <= entry["t"]), default=None)
        name, severity, message = entry["name"], entry["severity"], entry.get("message", "")
        result.alerts.append(Alert(name, severity, step, entry["t"], message, timed))
    info = run_dir / "run.json"
    if info.exists():
        for stream in json.loads(info.read_text()).get("streams", []):
            if stream.get("rank", -1) >= 0:
                keys = ("sent", "received", "dropped", "lost")
                result.accounting = {key: stream.get(key) for key in keys}


def run_suite(
    scenarios: Sequence[Scenario],
    workdir: Path,
    *,
    jobs: int = 2,
    on_result: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Run ``scenarios``, ``jobs`` at a time, longest first; results in the given order."""
    order = sorted(scenarios, key=timeout_for, reverse=True)

    def one(scenario: Scenario) -> RunResult:
        result = run_scenario(scenario, workdir)
        if on_result is not None:
            on_result(result)
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = {r.scenario.name: r for r in pool.map(one, order)}
    return [results[scenario.name] for scenario in scenarios]
