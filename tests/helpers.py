"""Real agents and trainers in subprocesses, and reading what they stored."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from agent.cli.launcher import agent_argv

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent


def short_ipc_endpoint() -> str:
    """An ipc:// endpoint in a fresh 0700 dir (socket paths must stay under ~100 chars)."""
    return f"ipc://{tempfile.mkdtemp(prefix='or-')}/agent.sock"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_agent(
    endpoint: str, runs_dir: Path, *extra: str, sinks: str | None = "none"
) -> subprocess.Popen[bytes]:
    """A real agent process, returned once it has bound its endpoint (no sinks by default)."""
    read_fd, write_fd = os.pipe()
    agent = subprocess.Popen(
        agent_argv(
            endpoint,
            runs_dir,
            write_fd,
            *(["--sinks", sinks] if sinks is not None else []),
            "--log-level",
            "WARNING",
            *extra,
        ),
        pass_fds=(write_fd,),
        stderr=subprocess.PIPE,
        # -P keeps the cwd off sys.path; tests' own sinks (tests.faulty_sinks) need the repo.
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = ready.readline()
    assert line.strip() == b"ready", (
        f"agent did not start: {agent.stderr.read().decode() if agent.stderr else ''}"
    )
    return agent


def stop_agent(agent: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM and wait: the agent drains, writes run.json and exits."""
    agent.terminate()
    return agent.wait(timeout)


def run_trainer(
    code: str, endpoint: str | None, run_id: str, timeout: float = 60.0, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a trainer script in its own process with the probe's environment."""
    environment = dict(os.environ, OUTRIDER_RUN_ID=run_id, OUTRIDER_PROBE_RAISE="1", **env)
    environment.pop("OUTRIDER_ENDPOINT", None)
    if endpoint is not None:
        environment["OUTRIDER_ENDPOINT"] = endpoint
    return subprocess.run(
        [PYTHON, "-c", code], env=environment, capture_output=True, text=True, timeout=timeout
    )


def lines(run_dir: Path, *, agent_lines: bool = False) -> list[dict[str, Any]]:
    """metrics.jsonl's records; with ``agent_lines`` also the agent's own lines
    (summaries, derived statistics, system samples, alerts: stream ``agent``)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    # A live agent may be mid-write: only lines that have their newline are whole.
    complete = data[: data.rfind(b"\n") + 1]
    entries = [orjson.loads(line) for line in complete.splitlines() if line]
    return [e for e in entries if agent_lines or e.get("stream") != "agent"]


def run_info(run_dir: Path) -> dict[str, Any]:
    return orjson.loads((run_dir / "run.json").read_bytes())  # type: ignore[no-any-return]


def trainer_streams(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Streams of trainer processes (the launcher's own stream has rank -1)."""
    return [s for s in info["streams"] if s["rank"] >= 0]
