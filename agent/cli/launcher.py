"""``outrider run -- CMD``: the agent as a sidecar of one training command.

The agent runs in its own session, so a Ctrl-C meant for the trainer does not
stop it before the trainer's last records arrive; the launcher stops it after
the trainer exits and waits for its drain (bounded). The trainer always runs:
if the agent cannot start, telemetry is switched off and the launcher says so
(unless ``--require-agent``).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack
import orjson
import zmq

from agent.config import DashboardSettings
from agent.ingest.endpoint import private_ipc_dir
from agent.store.disk import check_runs_dir
from agent.store.runs import JOBS_DIR
from probe import protocol
from probe.identity import Identity, new_run_id, new_stream_id


@dataclass(frozen=True)
class JobTier:
    """The job tier of one node: where its agent forwards, and whether it hosts the
    aggregator (the node of node rank 0, by default)."""

    forward_to: str  # HOST:PORT
    serve: bool = False
    keys_dir: Path | None = None
    insecure: bool = False

    def agent_args(self) -> list[str]:
        args = ["--forward-to", self.forward_to]
        if self.keys_dir is not None:
            args += ["--keys", str(self.keys_dir)]
        if self.insecure:
            args.append("--insecure")
        return args


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

#: the ``outrider`` command, run so that the trainer's directory stays off sys.path
OUTRIDER = (sys.executable, "-P", "-m", "agent")


def agent_argv(endpoint: str, runs_dir: Path, ready_fd: int, *options: str) -> list[str]:
    """The command that starts an agent which says 'ready' on ``ready_fd`` once bound.

    ``python -P``: the trainer's directory (with its own agent.py?) stays off sys.path.
    """
    return [
        *OUTRIDER,
        "agent",
        "--endpoint",
        endpoint,
        "--runs-dir",
        str(runs_dir),
        "--ready-fd",
        str(ready_fd),
        *options,
    ]


def agent_command(
    endpoint: str,
    runs_dir: Path,
    run_id: str,
    meta: dict[str, Any],
    ready_fd: int,
    drain: float,
    extra: list[str],
) -> list[str]:
    """``outrider run``'s agent: its run declared, and it exits with its parent."""
    return agent_argv(
        endpoint,
        runs_dir,
        ready_fd,
        "--run-id",
        run_id,
        "--meta",
        orjson.dumps(meta).decode(),
        "--drain-timeout",
        str(drain),
        "--parent-pid",
        str(os.getpid()),
        *extra,
    )


def wait_ready(fd: int, timeout: float, agent: subprocess.Popen[bytes]) -> bool:
    """True once the agent wrote 'ready' on the pipe; False if it died or timed out."""
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        readable, _, _ = select.select([fd], [], [], 0.1)
        if readable:
            chunk = os.read(fd, 64)
            if not chunk:
                return False  # the agent closed the pipe without saying ready
            buffer += chunk
            if b"ready" in buffer:
                return True
        if agent.poll() is not None:
            return False
    return False


def start_and_wait_ready(
    argv: Callable[[int], list[str]], timeout: float
) -> tuple[subprocess.Popen[bytes], bool]:
    """Start ``argv(ready_fd)`` in its own session and wait (bounded) until it writes
    'ready' on that descriptor; returns the process and whether it did."""
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(argv(write_fd), pass_fds=(write_fd,), start_new_session=True)
    os.close(write_fd)
    ready = wait_ready(read_fd, timeout, process)
    os.close(read_fd)
    return process, ready


def send_run_end(endpoint: str, run_id: str, exit_status: int) -> None:
    """Tell the agent how the trainer ended; it goes into run.json."""
    context = zmq.Context()
    try:
        sock = context.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(endpoint)
        launcher = Identity(
            run=run_id, rank=-1, local_rank=-1, world_size=0, stream=f"launcher-{new_stream_id()}"
        )
        body = {"exit_status": exit_status, "end_time": time.time()}
        bye = {"produced": 2, "dropped": {}}
        records = [
            [protocol.RUN_END, 0, time.time(), None, body],
            [protocol.BYE, 1, time.time(), None, bye],
        ]
        sock.send(
            msgpack.packb([protocol.VERSION, launcher.envelope(), records], use_bin_type=True)
        )
        sock.close()
    finally:
        context.term()


def where_to_look(run_dir: Path) -> list[str]:
    """One line per sink output found in the run directory: how to open it."""
    lines = []
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"TensorBoard: tensorboard --logdir {run_dir / 'tensorboard'}")
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    if offline:
        lines.append(f"W&B (offline): {offline[-1]}; upload with `wandb sync {offline[-1]}`")
    return lines


def dashboard_url(settings: DashboardSettings) -> str | None:
    """Where the agent's dashboard will be, for the banner; None when it is off."""
    if not settings.enabled:
        return None
    from agent.dashboard.process import url

    return url(settings.host, settings.port)


def exit_code(returncode: int) -> int:
    """A child killed by signal N exits the launcher with 128+N, as a shell would."""
    return 128 - returncode if returncode < 0 else returncode


def _foreground() -> bool:
    """Whether we share the terminal's foreground group (the child then got Ctrl-C itself)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError):
        return False


def run(
    command: list[str],
    *,
    runs_dir: Path,
    run_id: str | None = None,
    endpoint: str | None = None,
    drain_timeout: float = 10.0,
    start_timeout: float = 15.0,
    require_agent: bool = False,
    quiet: bool = False,
    agent_args: list[str] | None = None,
    close_allowance: float = 50.0,
    host: str | None = None,
    job_tier: JobTier | None = None,
    aggregator_args: list[str] | None = None,
    dashboard_url: str | None = None,
) -> int:
    """Start the agent, run ``command`` with the probe's environment, stop the agent.

    ``close_allowance``: seconds the agent may take after draining (its statistics'
    and sinks' close timeouts) before it is killed.
    """

    def say(message: str) -> None:
        if not quiet:
            print(f"outrider: {message}", file=sys.stderr, flush=True)

    run_id = run_id or new_run_id()
    runs_dir = runs_dir.resolve()
    unusable = check_runs_dir(runs_dir)
    if unusable is not None:
        if require_agent:
            say(f"cannot store runs in {runs_dir}: {unusable}; not running the command")
            return 2
        say(f"cannot store runs in {runs_dir}: {unusable}; running the command with telemetry OFF")
        return _run_without_telemetry(command, say)
    ipc_dir = None
    if endpoint is None:
        ipc_dir = private_ipc_dir()
        endpoint = f"ipc://{ipc_dir / 'agent.sock'}"
    meta = {"command": command, "cwd": os.getcwd(), "launcher": "outrider run"}
    extra = list(agent_args or [])
    if host:
        extra += ["--host", host]
    aggregator = None
    if job_tier is not None:
        extra += job_tier.agent_args()
        if job_tier.serve:
            aggregator = _start_aggregator(
                job_tier, runs_dir / JOBS_DIR, drain_timeout, start_timeout, aggregator_args, say
            )
    agent, ready = start_and_wait_ready(
        lambda fd: agent_command(endpoint, runs_dir, run_id, meta, fd, drain_timeout, extra),
        start_timeout,
    )

    env = dict(os.environ)
    if host:
        env[protocol.ENV_HOST] = host
    env[protocol.ENV_ENDPOINT] = endpoint
    env[protocol.ENV_RUN_ID] = run_id
    if ready:
        say(f"run {run_id}: agent listening at {endpoint}, storing in {runs_dir / run_id}")
        if dashboard_url is not None:
            say(f"dashboard: {dashboard_url}run?id={run_id}")
    else:
        _stop_agent(agent, 0.0)
        if require_agent:
            say("the agent did not start; not running the command (--require-agent)")
            return 2
        say("the agent did not start; running the command with telemetry OFF")
        env[protocol.ENV_DISABLED] = "1"

    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        say(f"cannot run {command[0]!r}: {exc}")
        _stop_agent(agent, drain_timeout, close_allowance)
        if aggregator is not None:
            _stop_agent(aggregator, drain_timeout, close_allowance)
        return 127

    status = exit_code(_wait_forwarding(child))
    if ready:
        send_run_end(endpoint, run_id, status)
        if not _stop_agent(agent, drain_timeout, close_allowance):
            say(f"the agent did not finish draining within {drain_timeout:.0f} s and was killed")
        say(f"run {run_id} stored in {runs_dir / run_id} (outrider show {run_id})")
        for line in where_to_look(runs_dir / run_id):
            say(line)
    if aggregator is not None:
        # After this node's agent said bye; the other nodes' agents finish about now too.
        if not _stop_agent(aggregator, drain_timeout, close_allowance):
            say("the job aggregator did not finish draining in time and was killed")
        job_dir = runs_dir / JOBS_DIR / run_id
        say(f"job view of run {run_id} in {job_dir} (outrider show {JOBS_DIR}/{run_id})")
        for line in where_to_look(job_dir):
            say(line)
    if ipc_dir is not None:
        shutil.rmtree(ipc_dir, ignore_errors=True)
    return status


def _start_aggregator(
    tier: JobTier,
    jobs_dir: Path,
    drain_timeout: float,
    start_timeout: float,
    options: list[str] | None,
    say: Callable[[str], None],
) -> subprocess.Popen[bytes] | None:
    """The job aggregator beside this node's agent, or None (said why) if it did not start:
    the node agents then hold their backlog and the job runs as it would without it."""

    def argv(ready_fd: int) -> list[str]:
        return [
            *OUTRIDER,
            "aggregator",
            "--bind",
            tier.forward_to,
            "--runs-dir",
            str(jobs_dir),
            "--ready-fd",
            str(ready_fd),
            "--parent-pid",
            str(os.getpid()),
            "--drain-timeout",
            str(drain_timeout),
            *(["--keys", str(tier.keys_dir)] if tier.keys_dir is not None else []),
            *(["--insecure"] if tier.insecure else []),
            *(options or []),
        ]

    aggregator, ready = start_and_wait_ready(argv, start_timeout)
    if not ready:
        _stop_agent(aggregator, 0.0)
        say(f"the job aggregator did not start at {tier.forward_to}; this node keeps its view")
        return None
    say(f"job aggregator listening at {tier.forward_to}, job views in {jobs_dir}")
    return aggregator


def _wait_forwarding(child: subprocess.Popen[bytes]) -> int:
    """Wait for the command, passing it the signals we get; returns its returncode."""
    return wait_forwarding([child])[0]


def wait_forwarding(children: Sequence[subprocess.Popen[bytes]]) -> list[int]:
    """Wait for each child, passing them all the signals we get; their returncodes."""

    def forward(signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and _foreground():
            return  # the terminal already sent it to the children
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signum)

    previous = {signum: signal.signal(signum, forward) for signum in FORWARDED}
    try:
        return [child.wait() for child in children]
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run_without_telemetry(command: list[str], say: Callable[[str], None]) -> int:
    """The command alone, the probe switched off, signals forwarded."""
    env = dict(os.environ)
    env[protocol.ENV_DISABLED] = "1"
    try:
        child = subprocess.Popen(command, env=env)
    except OSError as exc:
        say(f"cannot run {command[0]!r}: {exc}")
        return 127
    return exit_code(_wait_forwarding(child))


CLOSE_SLACK = 10.0  # seconds beyond the agent's own close budgets before it is killed


def _stop_agent(
    agent: subprocess.Popen[bytes], drain_timeout: float, close_allowance: float = 50.0
) -> bool:
    """SIGTERM (drain, finish statistics, close sinks, exit), then SIGKILL past the budget;
    True if it exited."""
    if agent.poll() is not None:
        return True
    agent.send_signal(signal.SIGTERM)
    try:
        agent.wait(drain_timeout + close_allowance)
        return True
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()
        return False
