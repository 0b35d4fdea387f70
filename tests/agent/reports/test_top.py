"""`outrider top`: a live run under a real agent shown with its numbers, and the per-rank
figures (pace, GPU, process, alerts, job ranks) from run stores written line by line."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.reports.top import Top
from tests.helpers import (
    PYTHON,
    lines,
    outrider,
    run_info,
    short_ipc_endpoint,
    start_agent,
    stop_agent,
    wait_for,
)

STEPS = 60
LIVE = """\
import sys, time
from pathlib import Path
import probe

probe.init()
for step in range({steps}):
    probe.log({{"loss": 3.0 / (step + 1), "grad_norm": 0.5 + step}}, step=step)
    time.sleep(0.005)
probe.flush()
release, deadline = Path(sys.argv[1]), time.monotonic() + 60
while not release.exists() and time.monotonic() < deadline:
    time.sleep(0.02)
probe.finish()
"""


def test_top_shows_a_live_run_with_its_numbers(tmp_path: Path) -> None:
    """While a trainer runs under a real agent, `top --json` has its rank with the last
    step, loss and gradient norm it logged and its pace from the stored times; `--once`
    prints the same run as a table."""
    runs_dir, endpoint = tmp_path / "runs", short_ipc_endpoint()
    agent = start_agent(endpoint, runs_dir)
    release = tmp_path / "release"
    env = dict(os.environ, OUTRIDER_ENDPOINT=endpoint, OUTRIDER_RUN_ID="live-1")
    env["OUTRIDER_PROBE_RAISE"] = "1"
    trainer = subprocess.Popen(
        [PYTHON, "-c", LIVE.format(steps=STEPS), str(release)], env=env, stderr=subprocess.PIPE
    )
    try:
        run_dir = runs_dir / "live-1"
        wait_for(lambda: len(lines(run_dir)) >= STEPS + 1, 30, "the trainer's steps stored")
        wait_for(
            lambda: (
                (run_dir / "run.json").exists()
                and any(s.get("pid") for s in run_info(run_dir).get("streams") or [])
            ),
            20,
            "run.json naming the trainer's stream (it is rewritten every few seconds)",
        )
        done = outrider("top", "--json", "--runs-dir", str(runs_dir))
        assert done.returncode == 0, done.stderr
        [run] = orjson.loads(done.stdout)["runs"]
        assert (run["run"], run["status"], run["step"]) == ("live-1", "running", STEPS - 1)
        [rank] = run["ranks"]
        assert (rank["rank"], rank["pid"], rank["status"]) == (0, trainer.pid, "running")
        assert rank["loss"] == pytest.approx(3.0 / STEPS)
        assert rank["grad_norm"] == pytest.approx(0.5 + STEPS - 1)
        points = [(e["t"], e["step"]) for e in lines(run_dir) if e["kind"] == "scalars"]
        (t0, s0), (t1, s1) = points[0], points[-1]  # all within the last 30 s
        assert rank["steps_per_second"] == pytest.approx((s1 - s0) / (t1 - t0))
        assert run["steps_per_second"] == rank["steps_per_second"]

        frame = outrider("top", "--once", "--runs-dir", str(runs_dir))
        assert frame.returncode == 0, frame.stderr
        [row] = [line for line in frame.stdout.splitlines() if line.strip().startswith("rank 0")]
        assert str(STEPS - 1) in row.split() and "running" in row
        assert "live-1" in frame.stdout
    finally:
        release.write_text("go")
        assert trainer.wait(30) == 0, trainer.stderr.read() if trainer.stderr else ""
        stop_agent(agent)
        shutil.rmtree(Path(endpoint.removeprefix("ipc://")).parent, ignore_errors=True)


def _write_run(run_dir: Path, info: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_bytes(orjson.dumps(info))
    (run_dir / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))


def _scalars(rank: int, step: int, t: float, **metrics: float) -> dict[str, Any]:
    return {"kind": "scalars", "rank": rank, "step": step, "t": t, "stream": f"s{rank}",
            "seq": step, "metrics": metrics}  # fmt: skip


NOW = 2_000_000_000.0


def test_ranks_get_their_pace_gpu_process_and_active_alerts(tmp_path: Path) -> None:
    """Rank 0 logs 2 steps/s, on GPU 0 (its local rank) and as pid 11; rank 1 finished;
    an alert within the window is active, an older one is not."""
    streams = [
        {"stream": "s0", "rank": 0, "local_rank": 0, "host": "n0", "pid": 11, "complete": False},
        {"stream": "s1", "rank": 1, "local_rank": 1, "host": "n0", "pid": 12, "complete": True},
    ]
    entries = [
        _scalars(0, step, NOW - 50 + 0.5 * step, loss=1.0 / (step + 1)) for step in range(100)
    ]
    entries += [_scalars(1, step, NOW - 400 + step, loss=9.0, grad_norm=2.0) for step in range(10)]
    entries.append(
        {
            "kind": "system", "rank": -1, "stream": "agent", "t": NOW - 1,
            "gpus": [
                {"index": 0, "util_percent": 93.0, "memory_used_bytes": 2 << 30,
                 "memory_total_bytes": 80 << 30},
                {"index": 1, "util_percent": 4.0},
            ],
            "processes": [{"pid": 11, "cpu_percent": 150.0, "rss_bytes": 3 << 30}],
        }
    )  # fmt: skip
    entries.append({"kind": "alert", "name": "old", "severity": "error", "rank": 0, "t": NOW - 900})
    entries.append({"kind": "alert", "name": "loss_spike", "severity": "warning", "rank": 0,
                    "t": NOW - 20, "step": 90, "message": "spike"})  # fmt: skip
    info = {"run_id": "two", "status": "running", "start_time": NOW - 500, "streams": streams}
    _write_run(tmp_path / "two", info, entries)

    top = Top(tmp_path, clock=lambda: NOW)
    top.refresh()
    [run] = top.snapshot()["runs"]
    zero, one = run["ranks"]
    assert zero["steps_per_second"] == pytest.approx(2.0)
    assert (zero["step"], zero["loss"]) == (99, pytest.approx(0.01))
    assert (zero["gpu"], zero["gpu_util_percent"], zero["gpu_memory_used_bytes"]) == (
        0,
        93.0,
        2 << 30,
    )
    assert (zero["cpu_percent"], zero["rss_bytes"]) == (150.0, 3 << 30)
    assert zero["alerts"] == ["loss_spike(warning)"] and run["alerts"] == ["loss_spike(warning)"]
    assert (one["status"], one["gpu"], one["gpu_util_percent"]) == ("done", 1, 4.0)
    assert (one["grad_norm"], one["steps_per_second"]) == (2.0, pytest.approx(1.0))
    assert run["step"] == 99 and run["steps_per_second"] == pytest.approx(1.0)


def test_a_job_view_shows_its_ranks_hosts_and_stragglers(tmp_path: Path) -> None:
    """`--run jobs/ID` reads an aggregator's job view: ranks and hosts from its job section,
    window figures from its lines; a rank that went quiet says so."""
    job = {"ranks": [{"rank": 0, "host": "n0", "local_rank": 0, "straggler": False},
                     {"rank": 1, "host": "n1", "local_rank": 0, "straggler": True}]}  # fmt: skip
    entries = []
    for window in range(5):
        step = 99 + 100 * window
        for rank in (0, 1):
            entries.append(
                {"kind": "scalars", "stream": "agent", "rank": rank, "host": f"n{rank}",
                 "step": step, "t": NOW - 180 + 20 * window, "metrics": {"loss": 2.0 - window / 10}}
            )  # fmt: skip
    info = {"run_id": "job7", "status": "running", "start_time": NOW - 200, "job": job}
    _write_run(tmp_path / "jobs" / "job7", info, entries)

    top = Top(tmp_path, ["jobs/job7"], clock=lambda: NOW)
    top.refresh()
    [run] = top.snapshot()["runs"]
    assert (run["run"], run["job"], run["status"]) == ("jobs/job7", True, "quiet 100s")
    assert [(r["rank"], r["host"], r["status"]) for r in run["ranks"]] == [
        (0, "n0", "quiet 100s"),
        (1, "n1", "straggler"),
    ]
    assert run["ranks"][0]["steps_per_second"] == pytest.approx(5.0)
    assert run["ranks"][1]["loss"] == pytest.approx(1.6)


def test_top_follows_new_lines_and_an_unknown_run_fails_clearly(tmp_path: Path) -> None:
    """A refresh picks up appended lines; `top --run nope` is one line, not a traceback."""
    info = {"run_id": "grow", "status": "running", "start_time": NOW - 10, "streams": []}
    _write_run(tmp_path / "grow", info, [_scalars(0, 0, NOW - 2, loss=1.0)])
    top = Top(tmp_path, clock=lambda: NOW)
    top.refresh()
    assert top.snapshot()["runs"][0]["step"] == 0
    with open(tmp_path / "grow" / "metrics.jsonl", "ab") as file:
        file.write(orjson.dumps(_scalars(0, 1, NOW - 1, loss=0.5)) + b"\n")
    top.refresh()
    [run] = top.snapshot()["runs"]
    assert (run["step"], run["loss"], run["steps_per_second"]) == (1, 0.5, 1.0)
    done = outrider("top", "--once", "--run", "nope", "--runs-dir", str(tmp_path))
    assert done.returncode == 1 and "no run 'nope'" in done.stderr


@pytest.mark.parametrize("command", ["top", "compare", "replay"])
def test_help_answers(command: str) -> None:
    """`outrider top|compare|replay --help` exits 0 and explains the command."""
    done = outrider(command, "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"Usage: outrider {command}")
    assert "--json" in done.stdout
