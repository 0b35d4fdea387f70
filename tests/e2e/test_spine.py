"""probe -> ZeroMQ -> agent -> run store, end to end, with real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from probe.sender import CONNECT_GRACE
from tests.helpers import (
    PYTHON,
    WORKER_CONFIG,
    lines,
    run_info,
    run_trainer,
    start_agent,
    stop_agent,
    trainer_streams,
    wait_for,
)

TRAINER = """
import probe, sys
probe.init()
for step in range({steps}):
    probe.log({{"loss": 1.0 / (step + 1), "lr": 0.001, "step_time": 0.01}}, step=step)
probe.text("sample", "hello", step={steps})
probe.event("checkpoint", step={steps}, path="/tmp/ckpt.pt")
probe.config({{"lr": 0.001, "layers": 4}})
"""


def assert_exact_accounting(stream: dict, stored: list[dict]) -> None:
    """Stored lines, probe-reported drops and transit losses add up to what was sent."""
    mine = [line for line in stored if line["stream"] == stream["stream"]]
    seqs = [line["seq"] for line in mine]
    assert len(seqs) == len(set(seqs)), "a record was stored twice"
    assert stream["received"] == len(mine)
    assert stream["complete"], "the stream never said bye"
    assert stream["received"] + sum(stream["dropped"].values()) + stream["lost"] == stream["sent"]
    assert max(seqs) < stream["sent"]


def test_every_record_is_stored_with_exact_accounting(agent, endpoint: str, runs_dir: Path) -> None:
    """5,000 scalars records plus text, event and config land in metrics.jsonl; none lost."""
    result = run_trainer(TRAINER.format(steps=5000), endpoint, "all-records")
    assert result.returncode == 0, result.stderr
    stop_agent(agent)
    run_dir = runs_dir / "all-records"
    stored = lines(run_dir)
    kinds = Counter(line["kind"] for line in stored)
    assert kinds["scalars"] == 5000
    assert kinds["text"] == kinds["event"] == kinds["config"] == kinds["hello"] == kinds["bye"] == 1
    scalars = [line for line in stored if line["kind"] == "scalars"]
    assert sorted(line["step"] for line in scalars) == list(range(5000))
    first = min(scalars, key=lambda line: line["step"])
    assert first["metrics"] == {"loss": 1.0, "lr": 0.001, "step_time": 0.01, "loss_nonfinite": 0}
    assert {"kind", "step", "rank", "t", "metrics"} <= first.keys()
    info = run_info(run_dir)
    [stream] = trainer_streams(info)
    assert_exact_accounting(stream, stored)
    assert stream["lost"] == 0 and sum(stream["dropped"].values()) == 0
    assert info["config"] == {"lr": 0.001, "layers": 4}
    assert info["last_step"] == 5000
    assert info["status"] == "finished"


def test_no_agent_leaves_the_trainer_unaffected(endpoint: str) -> None:
    """With nothing listening the loop runs, one warning is printed, and exit is prompt."""
    code = TRAINER.format(steps=20000) + "\nprint('trained', probe.stats()['dropped'])\n"
    started = time.monotonic()
    result = run_trainer(code, endpoint, "no-agent")
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "trained" in result.stdout
    assert result.stderr.count("no agent listening") == 1
    assert elapsed < 10, f"trainer took {elapsed:.1f} s without an agent"


def test_trainer_without_endpoint_warns_once_and_runs() -> None:
    """No OUTRIDER_ENDPOINT at all: telemetry is off, one warning, every call a no-op."""
    result = run_trainer(TRAINER.format(steps=1000) + "\nprint(probe.is_enabled())", None, "none")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert result.stderr.count("telemetry is off") == 1


SLOW_TRAINER = """
import probe, sys, time
probe.init()
for step in range({steps}):
    probe.log({{"loss": 1.0 / (step + 1), "lr": 0.001}}, step=step)
    if step % 100 == 0:
        print(step, flush=True)
    time.sleep(0.002)
print("done", probe.stats(), flush=True)
"""


def test_agent_killed_and_restarted(endpoint: str, runs_dir: Path) -> None:
    """SIGKILL the agent mid-run: the trainer finishes; a new agent receives; the counts add up."""
    first = start_agent(endpoint, runs_dir)
    env = dict(
        os.environ, OUTRIDER_ENDPOINT=endpoint, OUTRIDER_RUN_ID="killed", OUTRIDER_PROBE_RAISE="1"
    )
    launched = time.monotonic()
    trainer = subprocess.Popen(
        [PYTHON, "-c", SLOW_TRAINER.format(steps=3000)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    progress: list[str] = []
    reader = threading.Thread(target=lambda: progress.extend(trainer.stdout or []), daemon=True)
    reader.start()
    second = None
    try:
        run_dir = runs_dir / "killed"
        # Past the sender's connect grace: within it, records wait in the probe's queue for
        # an agent (none is lost, none dropped), so an early outage would not show as drops.
        wait_for(
            lambda: len(lines(run_dir)) > 300 and time.monotonic() - launched > CONNECT_GRACE + 0.5,
            30,
            "records before the kill, past the connect grace",
        )
        first.send_signal(signal.SIGKILL)
        first.wait()
        # Let the trainer log 200 steps into the void: those must be counted as drops.
        printed = len(progress)
        wait_for(lambda: len(progress) >= printed + 2, 30, "the trainer to go on without agent")
        second = start_agent(endpoint, runs_dir)
        before = len(lines(run_dir))
        wait_for(lambda: len(lines(run_dir)) > before + 100, 30, "records after the restart")
        assert trainer.wait(timeout=60) == 0, trainer.stderr.read() if trainer.stderr else ""
        reader.join(5)
        assert any(line.startswith("done") for line in progress)
        assert stop_agent(second) == 0
    finally:
        for process in (trainer, first, second):
            if process is not None and process.poll() is None:
                process.kill()
    stored = lines(run_dir)
    [stream] = trainer_streams(run_info(run_dir))
    assert_exact_accounting(stream, stored)
    [bye] = [line for line in stored if line["kind"] == "bye"]
    assert bye["produced"] == stream["sent"] and bye["dropped"] == stream["dropped"]
    assert stream["dropped"].get("no_agent", 0) > 0, "the outage was not counted"
    assert stream["lost"] < 2048, f"{stream['lost']} records vanished in transit"
    scalars_stored = sum(1 for line in stored if line["kind"] == "scalars")
    assert scalars_stored < 3000


FORKING_TRAINER = """
import os, probe
probe.init()
for step in range(500):
    probe.log({"loss": 1.0, "who": 0}, step=step)
pid = os.fork()  # records may still be queued: the child must not send them again
if pid == 0:
    for step in range(50):
        probe.log({"loss": 2.0, "who": 1}, step=step)
    probe.finish()
    os._exit(0)
for step in range(500, 1000):
    probe.log({"loss": 1.0, "who": 0}, step=step)
_, status = os.waitpid(pid, 0)
assert status == 0, status
"""


def test_fork_gives_the_child_its_own_stream(agent, endpoint: str, runs_dir: Path) -> None:
    """A forked child logs on a new stream; the parent's queued records are not duplicated."""
    result = run_trainer(FORKING_TRAINER, endpoint, "forked")
    assert result.returncode == 0, result.stderr
    stop_agent(agent)
    run_dir = runs_dir / "forked"
    stored = lines(run_dir)
    streams = trainer_streams(run_info(run_dir))
    assert len(streams) == 2
    by_pid = {s["pid"]: s for s in streams}
    assert len(by_pid) == 2
    for stream in streams:
        assert_exact_accounting(stream, stored)
    who = Counter(line["metrics"]["who"] for line in stored if line["kind"] == "scalars")
    assert who == {0: 1000, 1: 50}


DATALOADER_TRAINER = """
import torch, probe
from torch.utils.data import DataLoader, TensorDataset
probe.init()
data = DataLoader(TensorDataset(torch.arange(64.0)), batch_size=4, num_workers=2)
for epoch in range(2):
    for step, (batch,) in enumerate(data):
        probe.log({"loss": batch.mean()}, step=epoch * 16 + step)
"""


def test_dataloader_workers_do_not_disturb_the_stream(agent, endpoint: str, runs_dir: Path) -> None:
    """Forked DataLoader workers open no stream; tensors are logged as numbers."""
    result = run_trainer(DATALOADER_TRAINER, endpoint, "loader", timeout=120)
    assert result.returncode == 0, result.stderr
    stop_agent(agent)
    run_dir = runs_dir / "loader"
    stored = lines(run_dir)
    [stream] = trainer_streams(run_info(run_dir))
    assert_exact_accounting(stream, stored)
    losses = [line["metrics"]["loss"] for line in stored if line["kind"] == "scalars"]
    assert len(losses) == 32
    assert losses[0] == 1.5  # mean of 0, 1, 2, 3 as a number, not a tensor repr


EXIT_WITH_QUEUE = """
import probe
probe.init()
for step in range(30000):
    probe.log({"loss": 0.5, "lr": 0.1}, step=step)
print(probe.stats()["queue_depth"])
"""


def test_exit_with_unsent_records_delivers_them(agent, endpoint: str, runs_dir: Path) -> None:
    """A trainer that exits with records still queued gets them out through the atexit flush."""
    result = run_trainer(EXIT_WITH_QUEUE, endpoint, "exit-queue", OUTRIDER_QUEUE_SIZE="50000")
    assert result.returncode == 0, result.stderr
    stop_agent(agent)
    run_dir = runs_dir / "exit-queue"
    stored = lines(run_dir)
    [stream] = trainer_streams(run_info(run_dir))
    assert_exact_accounting(stream, stored)
    assert (
        sum(1 for line in stored if line["kind"] == "scalars")
        + sum(stream["dropped"].values())
        + stream["lost"]
        == 30000
    )


EXIT_ON_A_LARGE_MESSAGE = """
import numpy as np, probe, time
probe.init()
for step in range(10):
    probe.log({"loss": 0.5}, step=step)
    if step in (0, 9):  # over 64 KiB of samples a message: step 0's and, at exit, step 9's
        for layer in range(6):
            probe.histogram(f"w{layer}", np.random.randn(8192).astype(np.float32), step=step)
    if step < 9:
        time.sleep(0.05)
"""


def test_exit_right_after_a_large_message_delivers_it(agent, endpoint: str, runs_dir: Path) -> None:
    """A trainer that ends on a histogram step without probe.finish(): its last message is
    sent by the atexit flush, after pyzmq's own exit handlers have run, and arrives whole."""
    result = run_trainer(EXIT_ON_A_LARGE_MESSAGE, endpoint, "exit-large")
    assert result.returncode == 0, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    stop_agent(agent)
    run_dir = runs_dir / "exit-large"
    stored = lines(run_dir)
    [stream] = trainer_streams(run_info(run_dir))
    assert_exact_accounting(stream, stored)
    assert stream["lost"] == 0 and stream["dropped"] == {}
    histograms = [(line["step"], line["name"]) for line in stored if line["kind"] == "histogram"]
    assert sorted(histograms) == [(step, f"w{layer}") for step in (0, 9) for layer in range(6)]


def test_exit_is_bounded_when_the_agent_hangs(agent, endpoint: str, runs_dir: Path) -> None:
    """An agent that stops reading (SIGSTOP) cannot hold the trainer's exit past the budget."""
    agent.send_signal(signal.SIGSTOP)
    try:
        code = EXIT_WITH_QUEUE.replace("30000", "200000")
        started = time.monotonic()
        result = run_trainer(code, endpoint, "hung")
        elapsed = time.monotonic() - started
    finally:
        agent.send_signal(signal.SIGCONT)
    assert result.returncode == 0, result.stderr
    assert elapsed < 15, f"exit took {elapsed:.1f} s"


def test_second_agent_on_a_live_socket_is_refused(agent, endpoint: str, runs_dir: Path) -> None:
    """A second agent never steals the socket of a live one; a stale socket file is reused."""
    result = subprocess.run(
        [PYTHON, "-P", "-m", "agent", "agent", "--endpoint", endpoint, "--sinks", "none"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "another agent is already listening" in result.stderr
    assert agent.poll() is None
    result = run_trainer(TRAINER.format(steps=10), endpoint, "still-first")
    assert result.returncode == 0, result.stderr
    assert stop_agent(agent) == 0
    assert len(lines(runs_dir / "still-first")) > 10
    # The first agent removed its socket on exit; a dead agent's leftover file is reused.
    path = Path(endpoint.removeprefix("ipc://"))

    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # leaves the file behind, nobody listening
    second = start_agent(endpoint, runs_dir)
    assert stop_agent(second) == 0


def test_killed_agent_leaves_no_statistics_workers_behind(endpoint: str, runs_dir: Path) -> None:
    """SIGKILL (the OOM killer's way) takes the agent's statistics worker processes with it:
    a process pool's workers would otherwise wait on their job queue for ever."""
    agent = start_agent(endpoint, runs_dir, "--config", str(WORKER_CONFIG))
    try:
        workers = wait_for(
            lambda: [
                child
                for child in psutil.Process(agent.pid).children(recursive=True)
                if "multiprocessing" in " ".join(child.cmdline())
            ],
            30,
            "the agent's statistics workers",
        )
        agent.send_signal(signal.SIGKILL)
        agent.wait()
        wait_for(
            lambda: not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers),
            15,
            "the workers to exit after the agent",
        )
    finally:
        if agent.poll() is None:
            agent.kill()


def test_another_thread_wakes_the_sleeping_receive_loop(endpoint: str, runs_dir: Path) -> None:
    """The receive loop sleeps until its next beat; Agent.wake (the analysis's output, and
    signals through the same pipe) cuts the sleep short."""
    from agent.daemon import Agent

    agent = Agent(endpoint, runs_dir)
    try:
        threading.Thread(target=agent.wake).start()
        started = time.monotonic()
        assert agent.receive_burst(60_000) == 0
        assert time.monotonic() - started < 30  # without the wake-up: the full 60 s
    finally:
        agent.close()
