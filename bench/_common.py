"""Shared helpers for the benchmark scripts: a real agent process, the demo model,
percentiles, tables.

Benchmarks print figures; they never pass or fail on a number, because the
machines they run on are shared and noisy (see docs/performance.md).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from agent.cli.launcher import agent_argv

ROOT = Path(__file__).resolve().parent.parent
DEMO_PATH = ROOT / "examples" / "train_charlm.py"

#: the agent's default sinks, W&B offline and Prometheus on a free port, as a config file
DEFAULT_SINKS_CONFIG = """\
sinks:
  tensorboard:
    enabled: true
  prometheus:
    enabled: true
    port: 0
  wandb:
    enabled: true
    mode: offline
"""
#: the same, with W&B's offline run written as the run goes (its service beside the trainer)
LIVE_WANDB_SINKS_CONFIG = DEFAULT_SINKS_CONFIG + "    offline_at_end: false\n"


def short_ipc_endpoint(base: Path, name: str = "agent.sock") -> str:
    """An ``ipc://`` endpoint in a fresh 0700 dir under ``base`` (removed with it).

    Socket paths must stay under ~100 characters, so ``base`` should be a short temp dir.
    """
    path = Path(tempfile.mkdtemp(prefix="ipc-", dir=base)) / name
    if len(str(path)) > 100:
        raise ValueError(f"socket path too long for ipc://: {path}")
    return f"ipc://{path}"


#: ten scalar names of a typical training step (bench_log, bench_ingest)
SCALAR_NAMES = (
    "loss",
    "lr",
    "grad_norm",
    "acc",
    "tokens_per_second",
    "ppl",
    "weight_norm",
    "mem_gb",
    "eps",
    "step_time",
)


def start_agent(
    endpoint: str,
    runs_dir: Path,
    log_path: Path,
    *,
    options: Sequence[str] = ("--sinks", "none"),
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    preexec_fn: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start a real ``outrider agent`` the way ``outrider run`` does, return once it is bound.

    ``python -P -m agent`` keeps the current directory off ``sys.path``; the
    agent writes 'ready' on a pipe once its socket is bound. ``options`` are
    further ``outrider agent`` options; by default sinks are off, as these
    figures are about the probe and the run store, which every sink comes after.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    read_fd, write_fd = os.pipe()
    command = agent_argv(endpoint, runs_dir, write_fd, "--log-level", "WARNING", *options)
    with open(log_path, "ab") as log:
        agent = subprocess.Popen(
            command,
            pass_fds=(write_fd,),
            stdout=log,
            stderr=log,
            cwd=cwd,
            env=env,
            preexec_fn=preexec_fn,
        )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as ready:
        line = ready.readline()
    if line.strip() != b"ready":
        agent.kill()
        raise RuntimeError(f"the agent did not start:\n{log_path.read_text()[-2000:]}")
    return agent


def start_run_agent(
    endpoint: str,
    runs_dir: Path,
    run_id: str,
    workdir: Path,
    *,
    sinks: bool,
    cpus: set[int] | None,
    config_text: str = DEFAULT_SINKS_CONFIG,
) -> subprocess.Popen[bytes]:
    """An agent for one run, optionally pinned to ``cpus``: the run store only, or with
    ``sinks`` configured by ``config_text`` (default: the default sinks, W&B offline).

    Its log, config file and W&B's files go to ``workdir``, so nothing outlives the bench.
    """
    options = ["--run-id", run_id]
    if sinks:
        config = workdir / "agent.yaml"
        config.write_text(config_text)
        options += ["--config", str(config)]
    else:
        options += ["--sinks", "none"]

    def pin() -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return start_agent(
        endpoint,
        runs_dir,
        workdir / "agent.log",
        options=options,
        cwd=workdir,
        env=dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(workdir)),
        preexec_fn=pin,
    )


def stop_agent(agent: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """SIGTERM: the agent drains its socket, writes run.json and exits."""
    if agent.poll() is None:
        agent.terminate()
        try:
            agent.wait(timeout)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def stream_accounting(run_dir: Path) -> dict[str, Any]:
    """The trainer stream's accounting from run.json (sent, received, dropped, lost): every
    bench that drives a trainer reports it, since a figure bought by losing records is void."""
    info = json.loads((run_dir / "run.json").read_text())
    for stream in info.get("streams", []):
        if stream.get("rank", -1) >= 0:
            return {key: stream.get(key) for key in ("sent", "received", "dropped", "lost")}
    return {}


def load_demo() -> ModuleType:
    """Import examples/train_charlm.py by path (examples/ is not a package): the benches
    train the model users run, with its data, batches and learning-rate schedule."""
    spec = importlib.util.spec_from_file_location("train_charlm", DEMO_PATH)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {DEMO_PATH}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted data (q in 0..100)."""
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
    return float(ordered[index])


def wait_for_lines(path: Path, expected: int, timeout: float, poll: float = 0.005) -> float | None:
    """Tail ``path`` until it holds ``expected`` newline-terminated record lines.

    Returns the ``time.perf_counter()`` at which the count was first seen (so
    the resolution is ``poll`` plus one read), or None on timeout. Reading only
    the new bytes keeps the poller cheap next to the process under test.
    """
    deadline = time.perf_counter() + timeout
    count = 0
    handle = None
    try:
        while True:
            now = time.perf_counter()
            if handle is None and path.exists():
                handle = open(path, "rb")  # noqa: SIM115 - closed in finally
            if handle is not None:
                while chunk := handle.read(1 << 20):
                    # the agent's own lines (statistics, system samples) are not records
                    count += chunk.count(b"\n") - chunk.count(b'"stream":"agent"')
                if count >= expected:
                    return time.perf_counter()
            if now > deadline:
                return None
            time.sleep(poll)
    finally:
        if handle is not None:
            handle.close()


def machine() -> str:
    """CPU model and count, for the header of every report."""
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}"
    )


def agent_tree(agent: Any) -> list[Any]:
    """The agent's ``psutil.Process`` and its descendants (statistics workers, W&B's
    service), as far as they can still be read."""
    import psutil

    try:
        return [agent, *agent.children(recursive=True)]
    except psutil.Error:
        return []


def agent_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds so far of the agent process, and of its descendants (statistics
    workers, W&B's service); what could not be read counts as nothing."""
    import psutil

    own = children = 0.0
    try:
        agent = psutil.Process(pid)
        own = sum(agent.cpu_times()[:2])
        for child in agent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                children += sum(child.cpu_times()[:2])
    except psutil.Error:
        pass
    return own, children


def agent_cpu_by_part(pid: int) -> dict[str, float]:
    """CPU seconds so far of each part of the agent: its threads by their OS names
    (agent/threadnames.py; the receive loop is the main thread), its statistics
    workers, W&B's service and any other child by name. Linux only ({} elsewhere)."""
    import psutil

    parts: dict[str, float] = {}

    def add(part: str, seconds: float) -> None:
        parts[part] = parts.get(part, 0.0) + seconds

    try:
        agent = psutil.Process(pid)
        for thread in agent.threads():
            try:
                name = Path(f"/proc/{pid}/task/{thread.id}/comm").read_text().strip()
            except OSError:
                continue  # ended meanwhile
            add("receive loop" if thread.id == pid else name, thread.user_time + thread.system_time)
        for child in agent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                command = " ".join(child.cmdline())
                part = "statistics workers" if "multiprocessing" in command else child.name()
                add(part, sum(child.cpu_times()[:2]))
    except (psutil.Error, OSError):
        return {}
    return parts


def load_average() -> float:
    """1-minute load average: other work on a shared 2-CPU box shows up here."""
    return os.getloadavg()[0]


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain, aligned text table (first column left-aligned, the rest right-aligned)."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def fmt(row: Sequence[str]) -> str:
        cells = [
            str(cell).ljust(widths[i]) if i == 0 else str(cell).rjust(widths[i])
            for i, cell in enumerate(row)
        ]
        return "  ".join(cells)

    print(fmt(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(fmt(row))
