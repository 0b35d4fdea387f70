"""The job tier end to end: two torchrun "nodes" on this machine, each under its own
`outrider run`, feed one job aggregator over TCP; stragglers, restarts and kills."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import (
    OUTRIDER,
    PYTHON,
    clean_env,
    lines,
    outrider,
    run_info,
    start_agent,
    stop_agent,
    trainer_dir,
    wait_for,
)
from tests.prometheus_server import free_port
from tests.wandb_reader import read_offline_run

pytestmark = [pytest.mark.slow, pytest.mark.serial]

#: a DDP trainer on gloo; SLOW_RANK sleeps SLOW_SECONDS in its forward each step, and
#: FAIL_RANK exits at FAIL_STEP on torchrun's first attempt
DDP = """
import os, sys, time
import torch, torch.distributed as dist
import probe

# A store prefix per torchrun attempt: gloo's keys of a failed attempt must not be read by
# the next one (they name the dead workers' ports).
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                      is_master=False, timeout=__import__("datetime").timedelta(seconds=60))
dist.init_process_group("gloo", store=dist.PrefixStore(f"attempt{attempt}/", store),
                        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
rank = dist.get_rank()
torch.manual_seed(rank)
slow = int(os.environ.get("SLOW_RANK", "-1")) == rank
pause = float(os.environ.get("SLOW_SECONDS", "0.03"))
fail = int(os.environ.get("FAIL_RANK", "-1")) == rank and os.environ.get(
    "TORCHELASTIC_RESTART_COUNT", "0") == "0"


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(16, 1)

    def forward(self, x):
        if slow:
            time.sleep(pause)
        return self.layer(x)


model = torch.nn.parallel.DistributedDataParallel(Net())
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
probe.init()
probe.watch(model, optimizer)
for step in range(int(os.environ.get("STEPS", "160"))):
    if fail and step == int(os.environ.get("FAIL_STEP", "40")):
        sys.exit(3)
    x = torch.randn(8, 16)
    loss = model(x).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    probe.log({"loss": loss.detach()}, step=step)
    time.sleep(0.005)
dist.destroy_process_group()
"""

CONFIG = """
stats: {window_steps: 10, feature_map: "off", dashboard_seconds: 0}
system: {enabled: false}
aggregation: {window_wait_seconds: 5, accounting_seconds: 1, heartbeat_seconds: 0.5}
sinks:
  prometheus: {enabled: false}
  tensorboard: {flush_secs: 1}
  wandb: {rows_per_second: 0}
"""


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = clean_env(WANDB_MODE="offline", WANDB_SILENT="true", **extra)
    env.pop("OUTRIDER_SINKS", None)
    env.pop("WANDB_API_KEY", None)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[name] = str(tmp_path / "wandb-home")
    return env


def torchrun(node_rank: int, master_port: int, *, nnodes: int = 2) -> list[str]:
    return [
        "torchrun",
        "--nnodes",
        str(nnodes),
        "--node-rank",
        str(node_rank),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(master_port),
        "--nproc-per-node",
        "2",
        "ddp.py",
    ]


def start_node(
    tmp_path: Path,
    work: Path,
    node: int,
    aggregator: str,
    master_port: int,
    env: dict[str, str],
    *extra: str,
) -> subprocess.Popen[str]:
    """One "node": `outrider run` of a torchrun launch, with its own runs dir and host label."""
    config = tmp_path / "agent.yaml"
    config.write_text(CONFIG)
    return subprocess.Popen(
        [
            OUTRIDER, "run", "--runs-dir", str(tmp_path / f"node{node}"), "--run-id", "job",
            "--host", f"node{node}", "--config", str(config), "--aggregator", aggregator,
            *extra, "--", *torchrun(node, master_port),
        ],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def finish(node: subprocess.Popen[str], timeout: float = 180) -> str:
    _, err = node.communicate(timeout=timeout)
    assert node.returncode == 0, err
    return err


def two_node_job(tmp_path: Path, env: dict[str, str]) -> Path:
    """Node 0 hosts the aggregator; returns the job view's directory."""
    work = trainer_dir(tmp_path / "work", {"ddp.py": DDP})
    where = f"127.0.0.1:{free_port()}"
    master = free_port()
    node0 = start_node(tmp_path, work, 0, where, master, env, "--serve-aggregator")
    node1 = start_node(tmp_path, work, 1, where, master, env)
    err0, _ = finish(node0), finish(node1)
    assert f"job aggregator listening at {where}" in err0
    return tmp_path / "node0" / "jobs" / "job"


def node_accounting(info: dict[str, Any], node: str) -> dict[str, Any]:
    accounting = info["job"]["nodes"][node]
    records, uplink = accounting["records"], accounting["uplink"]
    assert records["received"] + records["dropped"] + records["lost"] == records["sent"]
    assert uplink["received"] + uplink["dropped"] + uplink["lost"] == uplink["sent"]
    return accounting


def alerts_named(job_dir: Path, name: str) -> list[dict[str, Any]]:
    return [
        x
        for x in lines(job_dir, agent_lines=True)
        if x.get("kind") == "alert" and x.get("name") == name
    ]


@pytest.fixture(scope="module")
def slowed_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One two-node job with rank 3 slowed, shared by the job view's tests (each launch
    starts six torch processes): ``(the nodes' directory, the job view's directory)``."""
    tmp_path = tmp_path_factory.mktemp("slowed-job")
    env = job_env(tmp_path, SLOW_RANK="3", SLOW_SECONDS="0.04")
    return tmp_path, two_node_job(tmp_path, env)


def test_two_nodes_make_one_job_view_with_exact_accounting(slowed_job: tuple[Path, Path]) -> None:
    tmp_path, job_dir = slowed_job
    info = run_info(job_dir)
    assert info["status"] == "finished"
    ranks = sorted((r["rank"], r["host"], r["local_rank"]) for r in info["job"]["ranks"])
    assert ranks == [(0, "node0", 0), (1, "node0", 1), (2, "node1", 0), (3, "node1", 1)]
    for node in ("node0", "node1"):
        accounting = node_accounting(info, node)
        assert accounting["complete"]
        assert accounting["records"]["lost"] == 0 and accounting["records"]["dropped"] == 0
        assert accounting["uplink"]["lost"] == 0 and accounting["uplink"]["dropped"] == 0
        # the node's own run store agrees with what the aggregator was told
        node_info = run_info(tmp_path / node / "job")
        assert accounting["records"]["received"] == node_info["records"]
        # the node left W&B and TensorBoard to the aggregator
        assert not (tmp_path / node / "job" / "wandb").exists()
        assert not (tmp_path / node / "job" / "tensorboard").exists()
    # one W&B run for the job, one TensorBoard log with a directory per rank
    assert len(list((job_dir / "wandb").glob("offline-run-*"))) == 1
    assert sorted(p.name for p in (job_dir / "tensorboard").iterdir() if p.is_dir()) >= [
        "rank-0",
        "rank-1",
        "rank-2",
        "rank-3",
    ]
    stored = lines(job_dir, agent_lines=True)
    windows = [x for x in stored if x.get("kind") == "summary"]
    assert {x["rank"] for x in windows} == {0, 1, 2, 3}
    # rank 3's window means of loss, as stored, in W&B (rank3/loss) and TensorBoard (rank-3)
    rank3 = [
        (x["step"], x["metrics"]["loss"])
        for x in stored
        if x.get("kind") == "scalars" and x["rank"] == 3 and "loss" in x.get("metrics", {})
    ]
    assert len(rank3) == 16  # 160 steps, windows of 10
    offline = read_offline_run(job_dir)
    assert offline.run_id == "job"
    assert [(s, pytest.approx(v)) for s, v in offline.series("rank3/loss")] == rank3
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(job_dir / "tensorboard" / "rank-3"), size_guidance={"scalars": 0})
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == rank3
    shown = outrider("show", "jobs/job", "--runs-dir", str(tmp_path / "node0"))
    assert shown.returncode == 0, shown.stderr
    assert "4 ranks on 2 nodes" in shown.stdout and "node1" in shown.stdout


def test_a_slowed_rank_is_flagged_as_the_straggler(slowed_job: tuple[Path, Path]) -> None:
    """Rank 3 is flagged, and none of the three ranks that only waited for it."""
    _, job_dir = slowed_job
    found = alerts_named(job_dir, "straggler")
    assert found, "no straggler alert"
    assert {a["rank"] for a in found} == {3}
    assert "node1" in found[0]["message"]
    info = run_info(job_dir)
    assert info["job"]["stragglers"] == [3]


def test_aggregator_killed_and_restarted_mid_run_loses_nothing_silently(tmp_path: Path) -> None:
    """A standalone aggregator is SIGKILLed and started again on the same port: each node's
    uplink still adds up (received + dropped + lost == sent), and the job is complete."""
    env = job_env(tmp_path, STEPS="400")
    work = trainer_dir(tmp_path / "work", {"ddp.py": DDP})
    port = free_port()
    where = f"127.0.0.1:{port}"
    views = tmp_path / "views"

    def aggregator() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [OUTRIDER, "aggregator", "--bind", where, "--runs-dir", str(views), "--sinks", "none"],
            env=env, stderr=subprocess.PIPE,
        )  # fmt: skip

    first = aggregator()
    master = free_port()
    nodes = [start_node(tmp_path, work, n, where, master, env) for n in (0, 1)]
    wait_for(lambda: (views / "job" / "metrics.jsonl").exists() and
             (views / "job" / "metrics.jsonl").stat().st_size > 0, 60, "the job view")  # fmt: skip
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = aggregator()
    try:
        for node in nodes:
            finish(node)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(60)
    info = run_info(views / "job")
    for node in ("node0", "node1"):
        accounting = node_accounting(info, node)
        assert accounting["complete"]
        assert accounting["records"]["lost"] == 0
    assert sorted(r["rank"] for r in info["job"]["ranks"]) == [0, 1, 2, 3]


def test_torchrun_restart_keeps_both_attempts_apart(tmp_path: Path) -> None:
    """`--max-restarts 1` with rank 1 failing once: the job view keys ranks by restart and
    both attempts' streams add up."""
    env = job_env(tmp_path, FAIL_RANK="1", FAIL_STEP="30", STEPS="60")
    work = trainer_dir(tmp_path / "work", {"ddp.py": DDP})
    where = f"127.0.0.1:{free_port()}"
    config = tmp_path / "agent.yaml"
    config.write_text(CONFIG)
    done = outrider(
        "run", "--runs-dir", str(tmp_path / "runs"), "--run-id", "job", "--host", "solo",
        "--config", str(config), "--aggregator", where, "--serve-aggregator", "--",
        "torchrun", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "ddp.py",
        cwd=work, env=env, timeout=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    info = run_info(tmp_path / "runs" / "jobs" / "job")
    assert {r["restart"] for r in info["job"]["ranks"]} == {1}
    accounting = node_accounting(info, "solo")
    streams = accounting["streams"]
    trainer = [s for s in streams if s["rank"] >= 0]
    assert sorted((s["rank"], s["restart"]) for s in trainer) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert accounting["records"]["lost"] == 0


def test_a_node_with_the_wrong_key_delivers_nothing(tmp_path: Path) -> None:
    """CURVE: the aggregator's keys and a stranger's; the handshake fails, nothing is
    stored, and the aggregator says so."""
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    for directory in (keys, stranger):
        done = outrider("keys", str(directory))
        assert done.returncode == 0, done.stderr
    port = free_port()
    env = job_env(tmp_path)
    views = tmp_path / "views"
    aggregator = subprocess.Popen(
        [OUTRIDER, "aggregator", "--bind", f"127.0.0.1:{port}", "--keys", str(keys),
         "--runs-dir", str(views), "--sinks", "none"],
        env=env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        script = tmp_path / "train.py"
        script.write_text(
            "import probe\nprobe.init()\n"
            "for step in range(50):\n    probe.log({'loss': 1.0}, step=step)\n"
        )
        config = tmp_path / "agent.yaml"
        config.write_text(CONFIG)
        done = outrider(
            "run", "--runs-dir", str(tmp_path / "node"), "--run-id", "job", "--config",
            str(config), "--aggregator", f"127.0.0.1:{port}", "--keys", str(stranger),
            "--", PYTHON, str(script), env=env, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert run_info(tmp_path / "node" / "job")["records"] > 0
    finally:
        aggregator.send_signal(signal.SIGTERM)
        _, err = aggregator.communicate(timeout=60)
    assert not (views / "job").exists()
    assert "handshake" in err.lower()


def test_plain_tcp_off_loopback_needs_keys_or_insecure(tmp_path: Path) -> None:
    done = outrider("aggregator", "--bind", "10.0.0.1:29460", "--runs-dir", str(tmp_path))
    assert done.returncode == 2
    assert "--keys" in done.stderr and "--insecure" in done.stderr
    assert os.listdir(tmp_path) == []


def test_a_node_agent_killed_and_restarted_keeps_its_node_accounted(tmp_path: Path) -> None:
    """The node agent is SIGKILLed mid-run and a new one takes its endpoint: the aggregator
    sees two uplink streams of the node, and both tiers still add up."""
    port = free_port()
    where = f"127.0.0.1:{port}"
    env = job_env(tmp_path)
    views = tmp_path / "views"
    aggregator = subprocess.Popen(
        [OUTRIDER, "aggregator", "--bind", where, "--runs-dir", str(views), "--sinks", "none"],
        env=env, stderr=subprocess.PIPE,
    )  # fmt: skip
    config = tmp_path / "agent.yaml"
    config.write_text(CONFIG)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    node_args = ("--forward-to", where, "--host", "node7", "--config", str(config))
    runs = tmp_path / "node7"
    first = start_agent(endpoint, runs, *node_args)
    trainer = subprocess.Popen(
        [PYTHON, "-c", "import probe, time\nprobe.init()\nfor step in range(400):\n"
         "    probe.log({'loss': 1.0 / (step + 1)}, step=step)\n    time.sleep(0.01)\n"],
        env={**env, "OUTRIDER_ENDPOINT": endpoint, "OUTRIDER_RUN_ID": "job"},
    )  # fmt: skip
    try:
        wait_for(lambda: (views / "job" / "run.json").exists(), 30, "the job view")
        first.send_signal(signal.SIGKILL)
        first.wait()
        second = start_agent(endpoint, runs, *node_args)
        assert trainer.wait(60) == 0
        assert stop_agent(second, 60) == 0
    finally:
        aggregator.send_signal(signal.SIGTERM)
        aggregator.wait(60)
    info = run_info(views / "job")
    accounting = node_accounting(info, "node7")
    assert len(accounting["uplinks"]) == 2
    assert sum(u["complete"] for u in accounting["uplinks"]) == 1  # the killed one never said bye
    records, node = accounting["records"], run_info(runs / "job")
    assert records["sent"] == sum(stream["sent"] for stream in node["streams"])
    assert records["received"] == node["records"]
    assert all(stream["complete"] for stream in node["streams"])
