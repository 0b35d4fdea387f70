"""The ``outrider`` command line, end to end: real processes, real sockets, real git.

``outrider run`` is always started from a working directory holding the
user's own ``agent.py`` and ``sinks.py``, each of which exits the process if
imported: the agent must never pick them up from the trainer's directory.
"""

from __future__ import annotations

import contextlib
import platform
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
import zmq

from agent.threadnames import os_name
from tests.helpers import (
    OUTRIDER,
    PYTHON,
    AgentProcess,
    GoodStream,
    Pusher,
    clean_env,
    line_count,
    lines,
    outrider,
    run_info,
    trainer_dir,
    trainer_streams,
    wait_for,
)

TRAIN = """\
import sys
import probe

print("telemetry", "on" if probe.init() else "off", flush=True)
losses = [float(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [1.0]
for step, loss in enumerate(losses):
    probe.log({"loss": loss, "lr": 0.01}, step=step)
probe.text("sample", "hello", step=len(losses) - 1)
probe.event("done", step=len(losses) - 1)
open("ran", "w").write("yes")
sys.exit(int(sys.argv[2]) if len(sys.argv) > 2 else 0)
"""

KILL_SELF = """\
import os, signal
import probe

probe.init()
os.kill(os.getpid(), signal.SIGKILL)
"""

ON_SIGTERM = """\
import signal, sys, time
from pathlib import Path
import probe

assert probe.init()

def on_term(signum, frame):
    probe.event("sigterm", step=1, signal=signum)
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
probe.log({"x": 1.0}, step=0)
Path("ready").write_text("1")
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    time.sleep(0.02)
sys.exit(5)  # no signal arrived
"""

DDP = """\
import torch.distributed as dist
import probe

dist.init_process_group("gloo")
assert probe.init()
rank = dist.get_rank()
for step in range(100):
    probe.log({"loss": 1.0 / (step + 1), "rank": float(rank)}, step=step)
dist.barrier()
dist.destroy_process_group()
"""


def git(cwd: Path, *args: str) -> str:
    """Run git in a test repository, with an identity and no user or system config."""
    env = clean_env(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL="/dev/null",
        HOME=str(cwd),
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    done = subprocess.run(
        ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout.strip()


def git_repo(work: Path) -> str:
    """Make ``work`` a git repository with one commit of everything in it; returns the commit."""
    git(work, "init", "-q")
    git(work, "add", "-A")
    git(work, "commit", "-q", "-m", "initial")
    return git(work, "rev-parse", "HEAD")


def run_cmd(
    runs: Path, run_id: str, *command: str, cwd: Path, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return outrider(
        "run", "--runs-dir", str(runs), "--run-id", run_id, *extra, "--", *command, cwd=cwd
    )


def kill_tree(process: subprocess.Popen[str]) -> None:
    """On a failed test, kill `outrider run` and its children (its agent is in its own session)."""
    if process.poll() is not None:
        return
    children = psutil.Process(process.pid).children(recursive=True)
    process.kill()
    process.wait()
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def assert_clean_start(done: subprocess.CompletedProcess[str]) -> None:
    """The agent came up (it did not import the booby-trapped agent.py/sinks.py)."""
    assert "from the working directory" not in done.stderr, done.stderr
    assert "telemetry OFF" not in done.stderr, done.stderr
    assert "telemetry on" in done.stdout, (done.stdout, done.stderr)


# -- outrider run ------------------------------------------------------------------
def test_run_stores_run_with_metadata_from_dir_with_own_agent_py(tmp_path: Path) -> None:
    """`outrider run` beside a user agent.py/sinks.py stores records and full run.json metadata."""
    work = trainer_dir(tmp_path / "work", {"train.py": TRAIN})
    commit = git_repo(work)
    with open(work / "train.py", "a") as script:
        script.write("# an uncommitted change\n")
    runs = tmp_path / "runs"
    before = time.time()
    done = run_cmd(runs, "basic", "python", "train.py", "3,1,2", cwd=work)
    after = time.time()
    assert done.returncode == 0, done.stderr
    assert_clean_start(done)
    assert "run basic stored in" in done.stderr

    info = run_info(runs / "basic")
    assert info["run_id"] == "basic"
    assert info["status"] == "finished"
    assert info["exit_status"] == 0
    assert info["command"] == ["python", "train.py", "3,1,2"]
    assert info["cwd"] == str(work)
    assert before <= info["start_time"] <= info["trainer_end_time"] <= info["end_time"] <= after
    assert info["host"] == socket.gethostname()
    assert info["python"] == platform.python_version()
    branch = git(work, "rev-parse", "--abbrev-ref", "HEAD")
    patch = (runs / "basic" / "git.patch").read_text()
    untracked = info["git"].pop("untracked")
    assert set(untracked) <= {"ran"}  # the trainer writes it, maybe before git is read
    assert info["git"] == {
        "commit": commit,
        "branch": branch,
        "dirty": True,
        "untracked_count": len(untracked),
        "patch": "git.patch",
        "patch_bytes": len(patch),
        "truncated": False,
    }
    assert "+# an uncommitted change\n" in patch
    assert info["trainer"]["argv"] == ["train.py", "3,1,2"]

    [stream] = trainer_streams(info)
    assert stream["complete"] and stream["lost"] == 0 and stream["dropped"] == {}
    assert stream["received"] == stream["sent"]
    stored = lines(runs / "basic")
    losses = [line["metrics"]["loss"] for line in stored if line["kind"] == "scalars"]
    assert losses == [3.0, 1.0, 2.0]
    assert [line["name"] for line in stored if line["kind"] == "event"] == ["done"]


def test_run_records_trainer_environment_packages_and_untracked_files(tmp_path: Path) -> None:
    """The trainer's NCCL/CUDA settings reach run.json through its hello, secrets never do;
    requirements.txt pins the packages; an untracked file is named in run.json's git."""
    work = trainer_dir(tmp_path / "work", {"train.py": TRAIN})
    git_repo(work)
    (work / "scratch.py").write_text("print('not committed')\n")
    runs = tmp_path / "runs"
    env = clean_env(
        NCCL_DEBUG="INFO",
        CUDA_LAUNCH_BLOCKING="1",
        OMP_NUM_THREADS="2",
        HF_TOKEN="hf_do_not_store",
        MY_SECRET_KEY="do_not_store",
        NCCL_IB_AUTH_TOKEN="do_not_store",
    )
    done = outrider(
        "run", "--runs-dir", str(runs), "--run-id", "env", "--", "python", "train.py", "1",
        cwd=work,
        env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert_clean_start(done)
    info = run_info(runs / "env")
    environment = info["environment"]
    assert environment["NCCL_DEBUG"] == "INFO"
    assert environment["CUDA_LAUNCH_BLOCKING"] == "1"
    assert environment["OMP_NUM_THREADS"] == "2"
    assert "environment" not in info["trainer"]
    assert "do_not_store" not in (runs / "env" / "run.json").read_text()
    assert "hf_do_not_store" not in (runs / "env" / "run.json").read_text()
    assert (info["git"]["dirty"], info["git"]["patch"]) == (False, None)
    assert "scratch.py" in info["git"]["untracked"]
    pins = (runs / "env" / "requirements.txt").read_text().splitlines()
    assert any(pin.startswith("msgpack==") for pin in pins)
    assert info["packages"]["count"] == len(pins)


def test_exit_status_is_propagated_and_recorded(tmp_path: Path) -> None:
    """A command exiting 3 makes `outrider run` exit 3; run.json says failed, exit 3, git clean."""
    work = trainer_dir(tmp_path / "work", {"train.py": TRAIN})
    commit = git_repo(work)
    runs = tmp_path / "runs"
    done = run_cmd(runs, "three", "python", "train.py", "1,2", "3", cwd=work)
    assert done.returncode == 3, done.stderr
    assert_clean_start(done)
    info = run_info(runs / "three")
    assert (info["status"], info["exit_status"]) == ("failed", 3)
    assert info["git"]["commit"] == commit
    assert info["git"]["dirty"] is False
    assert len([line for line in lines(runs / "three") if line["kind"] == "scalars"]) == 2


def test_command_killed_by_sigkill_exits_137(tmp_path: Path) -> None:
    """A command killed by SIGKILL makes `outrider run` exit 137 and the run is marked killed."""
    work = trainer_dir(tmp_path / "work", {"die.py": KILL_SELF})
    runs = tmp_path / "runs"
    done = run_cmd(runs, "killed", "python", "die.py", cwd=work)
    assert done.returncode == 128 + signal.SIGKILL, done.stderr
    info = run_info(runs / "killed")
    assert (info["status"], info["exit_status"]) == ("killed", 137)
    assert info["git"] is None  # not a repository


def test_missing_command_exits_127(tmp_path: Path) -> None:
    """A command that cannot be started gives exit 127 and a message naming it."""
    work = trainer_dir(tmp_path / "work", {})
    done = run_cmd(tmp_path / "runs", "missing", str(work / "no-such-command"), cwd=work)
    assert done.returncode == 127
    assert "no-such-command" in done.stderr


def test_sigterm_to_outrider_run_is_forwarded_to_the_command(tmp_path: Path) -> None:
    """SIGTERM to `outrider run` reaches the command, whose handler's last record is stored."""
    work = trainer_dir(tmp_path / "work", {"term.py": ON_SIGTERM})
    runs = tmp_path / "runs"
    process = subprocess.Popen(
        [OUTRIDER, "run", "--runs-dir", str(runs), "--run-id", "term", "--", "python", "term.py"],
        cwd=work,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(
            lambda: (work / "ready").exists() or process.poll() is not None,
            30,
            "the command to install its SIGTERM handler",
        )
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        kill_tree(process)
    assert process.returncode == 0, stderr
    info = run_info(runs / "term")
    assert (info["status"], info["exit_status"]) == ("finished", 0)
    events = [line for line in lines(runs / "term") if line["kind"] == "event"]
    assert [(e["name"], e["attrs"]["signal"]) for e in events] == [("sigterm", signal.SIGTERM)]
    [stream] = trainer_streams(info)
    assert stream["complete"] and stream["lost"] == 0


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback TCP port a listening socket of this test holds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        yield holder.getsockname()[1]


def test_agent_failure_runs_command_with_telemetry_off(tmp_path: Path, taken_port: int) -> None:
    """When the agent cannot bind, the command still runs (and exits as it does), telemetry off."""
    work = trainer_dir(tmp_path / "work", {"train.py": TRAIN})
    done = run_cmd(
        tmp_path / "runs",
        "nobind",
        "python",
        "train.py",
        "1,2",
        "4",
        cwd=work,
        extra=("--tcp", f"127.0.0.1:{taken_port}"),
    )
    assert done.returncode == 4, done.stderr
    assert "telemetry OFF" in done.stderr
    assert "telemetry off" in done.stdout
    assert (work / "ran").exists()


def test_require_agent_exits_2_without_running(tmp_path: Path, taken_port: int) -> None:
    """With --require-agent and no agent, `outrider run` exits 2 and never starts the command."""
    work = trainer_dir(tmp_path / "work", {"train.py": TRAIN})
    done = run_cmd(
        tmp_path / "runs",
        "nobind",
        "python",
        "train.py",
        cwd=work,
        extra=("--tcp", f"127.0.0.1:{taken_port}", "--require-agent"),
    )
    assert done.returncode == 2, done.stderr
    assert "--require-agent" in done.stderr
    assert not (work / "ran").exists()


# -- outrider runs / show ----------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Three finished runs made with `outrider run`, oldest first: alpha-1, alpha-2, beta-1."""
    base = tmp_path_factory.mktemp("recorded")
    work = trainer_dir(base / "work", {"train.py": TRAIN})
    runs = base / "runs"
    series = {"alpha-1": "5,3,nan,1,2", "alpha-2": "1", "beta-1": "7,6"}
    for run_id, losses in series.items():
        done = run_cmd(runs, run_id, "python", "train.py", losses, cwd=work)
        assert done.returncode == 0, done.stderr
    return {"runs": runs, "work": work, "ids": list(series)}


def show(recorded: dict[str, Any], *args: str) -> subprocess.CompletedProcess[str]:
    return outrider("show", *args, "--runs-dir", str(recorded["runs"]), cwd=recorded["work"])


def test_runs_table_lists_runs_newest_first(recorded: dict[str, Any]) -> None:
    """`outrider runs` prints a header and one row per run, newest first."""
    done = outrider("runs", "--runs-dir", str(recorded["runs"]))
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert rows[0].split()[:2] == ["RUN", "START"]
    assert [row.split()[0] for row in rows[1:]] == ["beta-1", "alpha-2", "alpha-1"]
    assert all("finished" in row for row in rows[1:])


def test_runs_json_matches_run_json(recorded: dict[str, Any]) -> None:
    """`outrider runs --json` gives each run's id, status, steps and counters, newest first."""
    done = outrider("runs", "--json", "--runs-dir", str(recorded["runs"]))
    assert done.returncode == 0, done.stderr
    rows = orjson.loads(done.stdout)
    assert [row["run_id"] for row in rows] == ["beta-1", "alpha-2", "alpha-1"]
    for row in rows:
        info = run_info(recorded["runs"] / row["run_id"])
        assert row["status"] == "finished"
        assert row["exit_status"] == 0
        assert row["records"] == info["records"] > 0
        assert (row["dropped"], row["lost"]) == (0, 0)
        assert row["duration_s"] == pytest.approx(info["end_time"] - info["start_time"])
    assert [row["steps"] for row in rows] == [1, 0, 4]


def test_runs_on_an_empty_dir_says_so(tmp_path: Path) -> None:
    """`outrider runs` on a directory with no runs exits 0 and says there are none."""
    done = outrider("runs", "--runs-dir", str(tmp_path / "none"))
    assert done.returncode == 0
    assert "no runs in" in done.stdout
    assert orjson.loads(outrider("runs", "--json", "--runs-dir", str(tmp_path)).stdout) == []


def test_show_json_summarises_a_known_series(recorded: dict[str, Any]) -> None:
    """`outrider show RUN --json` gives last/min/max/count of each metric, NaN counted apart."""
    done = show(recorded, "alpha-1", "--json")
    assert done.returncode == 0, done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["info"]["run_id"] == "alpha-1"
    assert summary["metrics"]["loss"] == {
        "count": 5,
        "last": 2.0,
        "last_step": 4,
        "min": 1.0,
        "min_step": 3,
        "max": 5.0,
        "non_finite": 1,
    }
    assert summary["metrics"]["lr"]["count"] == 5
    assert summary["metrics"]["lr"]["last"] == 0.01
    assert summary["records_by_kind"]["scalars"] == 5
    assert summary["records_by_kind"]["text"] == 1
    assert summary["last_texts"] == [{"name": "sample", "step": 4, "text": "hello"}]
    assert summary["corrupt_lines"] == 0


def test_show_text_output(recorded: dict[str, Any]) -> None:
    """`outrider show RUN` prints the run's status, command and a metric table."""
    done = show(recorded, "alpha-1")
    assert done.returncode == 0, done.stderr
    assert "alpha-1" in done.stdout and "finished" in done.stdout
    assert "python train.py 5,3,nan,1,2" in done.stdout
    [loss_row] = [row for row in done.stdout.splitlines() if row.startswith("loss ")]
    assert loss_row.split()[1:] == ["2", "1", "5", "5"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [("latest", "beta-1"), ("bet", "beta-1"), ("alpha-2", "alpha-2"), ("alpha-1", "alpha-1")],
)
def test_show_resolves_latest_and_unique_prefixes(
    recorded: dict[str, Any], name: str, expected: str
) -> None:
    """`show latest` is the newest run, and a unique prefix names its run."""
    done = show(recorded, name, "--json")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["info"]["run_id"] == expected


@pytest.mark.parametrize(
    ("name", "message"), [("alpha", "matches 2 runs"), ("nope", "no run 'nope'")]
)
def test_show_unknown_or_ambiguous_run_fails_clearly(
    recorded: dict[str, Any], name: str, message: str
) -> None:
    """An unknown or ambiguous run name exits non-zero with a message saying why."""
    done = show(recorded, name)
    assert done.returncode != 0
    assert message in done.stderr
    assert done.stdout == ""


def test_show_latest_with_no_runs_fails(tmp_path: Path) -> None:
    """`show latest` with no runs exits non-zero and says there are none."""
    done = outrider("show", "latest", "--runs-dir", str(tmp_path))
    assert done.returncode != 0
    assert "no runs in" in done.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["agent"], ["runs"], ["show"]])
def test_help_of_each_command(command: list[str]) -> None:
    """`outrider [COMMAND] --help` exits 0 and prints usage."""
    done = outrider(*command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: outrider")


# -- outrider agent ------------------------------------------------------------------
def test_agent_sigterm_drains_and_exits_0(tmp_path: Path) -> None:
    """On SIGTERM the agent stores what was already sent, writes run.json and exits 0 promptly.

    No training dashboard: the final one imports matplotlib in a fresh worker (seconds
    of CPU on a slow machine), which is the statistics' exit work, not the drain's.
    """
    config = tmp_path / "agent.yaml"
    config.write_text("stats:\n  dashboard_seconds: 0\n")
    agent = AgentProcess(tmp_path, "--config", str(config))
    good = GoodStream("drain")
    with Pusher(agent.endpoint) as push:
        for _ in range(20):
            push.send(good.message(100))
        wait_for(lambda: line_count(agent.run_dir("drain")) > 0, 20, "the first stored line")
        started = time.monotonic()
        status = agent.stop(timeout=15)
    elapsed = time.monotonic() - started
    assert status == 0, agent.stderr()
    assert elapsed < 5.0
    assert len(lines(agent.run_dir("drain"))) == good.sent == 2000
    info = run_info(agent.run_dir("drain"))
    assert info["agent"]["records"] == 2000
    assert info["status"] == "incomplete"  # the stream never said bye
    assert not Path(agent.endpoint.removeprefix("ipc://")).exists()


def test_agent_threads_carry_their_names_at_the_os_level(tmp_path: Path) -> None:
    """top -H and /proc show which part of the agent a thread is; the process keeps its name."""
    agent = AgentProcess(tmp_path, "--sinks", "tensorboard")
    try:
        task = Path(f"/proc/{agent.process.pid}/task")

        def names() -> set[str] | None:
            found = {(t / "comm").read_text().strip() for t in task.iterdir()}
            wanted = {"analysis", "system-sampler", "sink-tensorboar"}
            return found if wanted <= found else None

        found = wait_for(names, 20, "the agent's named threads")
        main = (task / str(agent.process.pid) / "comm").read_text().strip()
        assert main == (Path(f"/proc/{agent.process.pid}") / "comm").read_text().strip()
        assert main not in {"analysis", "system-sampler"} and main in found
    finally:
        agent.stop()


def test_os_thread_names_drop_the_prefix_and_fit_the_kernel() -> None:
    assert os_name("outrider-sink-wandb") == "sink-wandb"
    assert os_name("outrider-sink-tensorboard") == "sink-tensorboar"  # 15 characters kept
    assert os_name("Thread-3 (serve_forever)") == "Thread-3 (serve"


def test_agent_second_signal_forces_exit(tmp_path: Path) -> None:
    """A second signal during a (long) drain makes the agent exit at once, lines intact."""
    agent = AgentProcess(tmp_path, "--drain-timeout", "60")
    stop = threading.Event()

    def flood() -> None:
        with Pusher(agent.endpoint) as push:
            good = GoodStream("flood")
            while not stop.is_set():
                try:
                    push.socket.send(good.message(10), zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.001)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        wait_for(lambda: line_count(agent.run_dir("flood")) > 0, 20, "the first stored line")
        agent.signal(signal.SIGTERM)
        wait_for(lambda: "draining and exiting" in agent.stderr(), 10, "the drain to begin")
        assert agent.alive  # input keeps coming, so the drain goes on
        started = time.monotonic()
        agent.signal(signal.SIGTERM)
        status = agent.process.wait(10)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        sender.join(15)
        agent.kill()
    assert status == 1, agent.stderr()
    assert elapsed < 5.0
    assert "second signal" in agent.stderr()
    stored = (agent.run_dir("flood") / "metrics.jsonl").read_bytes()
    assert stored.endswith(b"\n")
    assert len(lines(agent.run_dir("flood"))) == stored.count(b"\n")


# -- the probe stays light -----------------------------------------------------------
def test_import_probe_does_not_import_heavy_modules(tmp_path: Path) -> None:
    """`import probe` imports neither torch, numpy, wandb nor asyncio (pyzmq's monitor module
    brings it: the sender thread takes that on); msgpack, its wire format, it may."""
    code = (
        "import probe, sys; print(sorted(m for m in ('torch','numpy','wandb','asyncio','msgpack')"
        " if m in sys.modules))"
    )
    done = subprocess.run(
        [PYTHON, "-c", code],
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    loaded = orjson.loads(done.stdout.replace("'", '"'))
    assert [m for m in loaded if m != "msgpack"] == []


def test_the_command_line_starts_without_numpy(tmp_path: Path) -> None:
    """`outrider runs`, `show`, the launcher of `outrider run`: none of them needs numpy (about
    0.1 s of every invocation); the commands that compute import it when they run."""
    code = "import agent.cli.commands, sys; print('numpy' in sys.modules)"
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=tmp_path, env=clean_env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


# -- torchrun ------------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_ranks_store_two_complete_streams(tmp_path: Path) -> None:
    """`outrider run -- torchrun --nproc-per-node 2` stores both ranks' 100 records, none lost."""
    work = trainer_dir(tmp_path / "work", {"ddp.py": DDP})
    runs = tmp_path / "runs"
    done = outrider(
        "run",
        "--runs-dir",
        str(runs),
        "--run-id",
        "ddp",
        "--",
        "torchrun",
        "--nproc-per-node",
        "2",
        "--standalone",
        "ddp.py",
        cwd=work,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    info = run_info(runs / "ddp")
    assert info["status"] == "finished"
    streams = sorted(trainer_streams(info), key=lambda s: s["rank"])
    assert [(s["rank"], s["local_rank"], s["world_size"]) for s in streams] == [
        (0, 0, 2),
        (1, 1, 2),
    ]
    assert len({s["pid"] for s in streams}) == 2
    for stream in streams:
        assert stream["complete"], stream
        assert stream["lost"] == 0 and stream["dropped"] == {}
        assert stream["received"] == stream["sent"]
    assert info["lost"] == 0
    stored = lines(runs / "ddp")
    for rank in (0, 1):
        rank_lines = [x for x in stored if x["kind"] == "scalars" and x["rank"] == rank]
        assert [x["step"] for x in rank_lines] == list(range(100))
        assert all(x["metrics"]["rank"] == float(rank) for x in rank_lines)


def test_agent_outlives_a_killed_launcher_until_the_trainer_is_done(tmp_path: Path) -> None:
    """SIGKILL of `outrider run` leaves no orphan: the agent stores the trainer's records, exits."""
    script = tmp_path / "slow.py"
    script.write_text(
        "import probe, time\nprobe.init()\n"
        "for step in range(150):\n    probe.log({'loss': 1.0}, step=step)\n    time.sleep(0.02)\n"
    )
    runs = tmp_path / "runs"
    launcher = subprocess.Popen(
        [OUTRIDER, "run", "--runs-dir", str(runs), "--run-id", "orphan", "--", PYTHON, str(script)],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    agent_pid = wait_for(
        lambda: next(
            (
                c.pid
                for c in psutil.Process(launcher.pid).children()
                if "agent" in " ".join(c.cmdline())
            ),
            None,
        ),
        15,
        "the agent process",
    )
    # The run's metrics.jsonl exists as soon as the agent opens the declared run: wait for
    # a record of the trainer itself, or the launcher may die before it starts the trainer.
    wait_for(
        lambda: any(line["kind"] == "scalars" for line in lines(runs / "orphan")),
        30,
        "the trainer's first records",
    )
    launcher.kill()
    launcher.wait()
    agent = psutil.Process(agent_pid)
    agent.wait(timeout=30)  # exits once the trainer said bye, not 60 s idle later
    stored = lines(runs / "orphan")
    assert sum(line["kind"] == "scalars" for line in stored) == 150
