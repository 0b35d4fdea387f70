"""Test helpers: real agents and trainers in subprocesses, raw ZeroMQ senders,
wire-format builders, and readers of what the run store holds."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import orjson
import zmq

from agent.cli.launcher import agent_argv
from probe import protocol

BIN = Path(sys.executable).parent
OUTRIDER = str(BIN / "outrider")
PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent
#: the agents' configuration in tests (no dashboard images, statistics on the agent's own
#: threads); a test's --config replaces it
TEST_CONFIG = REPO / "tests" / "agent_config.yaml"
#: the same with statistics worker processes, for the tests of those
WORKER_CONFIG = REPO / "tests" / "agent_config_workers.yaml"


def short_ipc_dir() -> Path:
    """A fresh 0700 directory under /tmp (ipc socket paths must stay under ~100 chars)."""
    return Path(tempfile.mkdtemp(prefix="or-"))


def short_ipc_endpoint() -> str:
    """An ipc:// endpoint in a fresh 0700 dir (socket paths must stay under ~100 chars)."""
    return f"ipc://{short_ipc_dir()}/agent.sock"


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without OUTRIDER_* settings, with the venv's bin first on PATH.

    Sinks, the dashboard and its images are off (the run store alone) unless a test asks
    for them.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OUTRIDER_SINKS"] = "none"
    env["OUTRIDER_DASHBOARD"] = "off"
    env["OUTRIDER_CONFIG"] = str(TEST_CONFIG)
    env["OUTRIDER_BUSY_FLUSH_INTERVAL"] = "0"  # messages independent of the machine's load
    env.update(extra)
    return env


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


@contextmanager
def every_core_busy(seconds: float = 15.0) -> Iterator[None]:
    """A spinning process per core (each ends after ``seconds`` at the latest): the
    machine's cores all busy, as a CPU trainer keeps them."""
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    spinners = [spawn.Process(target=_spin, args=(seconds,)) for _ in range(os.cpu_count() or 1)]
    for spinner in spinners:
        spinner.start()
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.terminate()
            spinner.join()


#: how long a test waits for a stopped agent to exit: a guard against a hang, not a measure
#: of the shutdown (the tests of bounded exits time it themselves). With the other test
#: worker's trainers busy on both cores, an agent's drain and close may take seconds of wall
#: time, and more for one below the trainers' priority (a test's own config keeps nice 10).
STOP_SECONDS = 60.0


def start_agent(
    endpoint: str,
    runs_dir: Path,
    *extra: str,
    sinks: str | None = "none",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """A real agent process, returned once it has bound its endpoint (no sinks by default);
    ``env`` adds to the test's environment."""
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
        env=dict(os.environ, **(env or {}), PYTHONPATH=str(REPO)),
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = ready.readline()
    assert line.strip() == b"ready", (
        f"agent did not start: {agent.stderr.read().decode() if agent.stderr else ''}"
    )
    return agent


def stop_agent(agent: subprocess.Popen[bytes], timeout: float = STOP_SECONDS) -> int:
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
    (summaries, derived statistics, system samples, alerts: stream ``agent``).

    A live agent may be mid-write, so only lines that have their newline are
    whole; a line a killed agent cut short is skipped.
    """
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    data = path.read_bytes()
    entries = []
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        if not line:
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if agent_lines or entry.get("stream") != "agent":
            entries.append(entry)
    return entries


def line_count(run_dir: Path) -> int:
    """Records stored (the agent's own lines not counted)."""
    return len(lines(run_dir))


def run_info(run_dir: Path) -> dict[str, Any]:
    return orjson.loads((run_dir / "run.json").read_bytes())  # type: ignore[no-any-return]


def trainer_streams(info: dict[str, Any]) -> list[dict[str, Any]]:
    """Streams of trainer processes (the launcher's own stream has rank -1)."""
    return [s for s in info["streams"] if s["rank"] >= 0]


# -- an agent process ------------------------------------------------------------
class AgentProcess:
    """``outrider agent`` on a private ipc endpoint, its stderr in a file."""

    def __init__(self, work: Path, *extra: str, log_level: str = "INFO") -> None:
        self.ipc_dir = short_ipc_dir()
        self.endpoint = f"ipc://{self.ipc_dir / 'agent.sock'}"
        self.runs_dir = work / "runs"
        self.stderr_path = work / "agent.stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()
        read_fd, write_fd = os.pipe()
        self.process = subprocess.Popen(
            [
                OUTRIDER,
                "agent",
                "--endpoint",
                self.endpoint,
                "--runs-dir",
                str(self.runs_dir),
                "--ready-fd",
                str(write_fd),
                "--log-level",
                log_level,
                "--sinks",
                "none",
                *extra,
            ],
            pass_fds=(write_fd,),
            stdout=subprocess.DEVNULL,
            stderr=self._stderr,
            cwd=work,
            env=clean_env(),
        )
        os.close(write_fd)
        try:
            self._wait_ready(read_fd, 20.0)
        finally:
            os.close(read_fd)

    def _wait_ready(self, fd: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        buffer = b""
        while b"ready" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise AssertionError(f"agent not ready in {timeout} s: {self.stderr()}")
            if select.select([fd], [], [], min(remaining, 0.1))[0]:
                chunk = os.read(fd, 64)
                if not chunk:
                    self.process.wait(5)
                    raise AssertionError(f"agent exited before ready: {self.stderr()}")
                buffer += chunk

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id

    def wait_lines(self, run_id: str, count: int, timeout: float = 20.0) -> None:
        """Wait until ``count`` lines are stored for ``run_id``; fail at once if the agent died."""

        def stored() -> bool:
            if not self.alive:
                raise AssertionError(f"the agent died ({self.process.returncode}): {self.stderr()}")
            return line_count(self.run_dir(run_id)) >= count

        wait_for(stored, timeout, f"{count} stored lines in run {run_id}")

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = STOP_SECONDS) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.alive:
            self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self.cleanup()

    def kill(self) -> None:
        if self.alive:
            self.process.kill()
            self.process.wait(10)
        self.cleanup()

    def cleanup(self) -> None:
        self._stderr.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)


# -- the wire --------------------------------------------------------------------
def envelope(run: str = "good-run", stream: str = "good", **overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = {
        "run": run,
        "stream": stream,
        "rank": 0,
        "local_rank": 0,
        "world_size": 1,
        "host": "testhost",
        "pid": 4242,
    }
    env.update(overrides)
    return env


def pack(env: Any, records: Any, version: Any = protocol.VERSION) -> bytes:
    return msgpack.packb([version, env, records], use_bin_type=True)  # type: ignore[no-any-return]


def scalars(seq: int, step: int, metrics: dict[str, Any]) -> list[Any]:
    return [protocol.SCALARS, seq, time.time(), step, metrics]


class GoodStream:
    """A well-behaved sender stream: contiguous seqs, counts what it sent."""

    def __init__(self, run: str = "good-run", stream: str = "good") -> None:
        self.env = envelope(run, stream)
        self.seq = 0
        self.sent = 0

    def message(self, count: int = 1) -> bytes:
        records = []
        for _ in range(count):
            records.append(scalars(self.seq, self.seq, {"loss": float(self.seq), "lr": 0.1}))
            self.seq += 1
        self.sent += count
        return pack(self.env, records)


class Pusher:
    """A raw ZeroMQ PUSH socket connected to the agent; sends exactly the bytes given."""

    def __init__(self, endpoint: str) -> None:
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 2000)
        self.socket.setsockopt(zmq.SNDTIMEO, 10_000)  # a send must never hang the test
        self.socket.connect(endpoint)

    def send(self, raw: bytes) -> None:
        self.socket.send(raw, copy=len(raw) < 65536)

    def close(self) -> None:
        self.socket.close(linger=2000)
        self.context.term()

    def __enter__(self) -> Pusher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- outrider run ------------------------------------------------------------------
def outrider(
    *args: str, cwd: Path | None = None, timeout: float = 60.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the ``outrider`` console script to completion, capturing its output."""
    return subprocess.run(
        [OUTRIDER, *args],
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


BOOBY_TRAP = 'raise SystemExit("imported {name}.py from the working directory")\n'


def trainer_dir(base: Path, scripts: dict[str, str]) -> Path:
    """A working directory with the user's own agent.py and sinks.py (booby-trapped) and scripts."""
    base.mkdir(parents=True, exist_ok=True)
    for name in ("agent", "sinks"):
        (base / f"{name}.py").write_text(BOOBY_TRAP.format(name=name))
    for name, code in scripts.items():
        (base / name).write_text(code)
    return base
