"""The dashboard process: started by the agent, served over HTTP from the stored runs,
a token off loopback, a taken port that never stops the agent, downsampling that keeps
spikes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.dashboard.process import TOKEN_ENV
from tests.helpers import OUTRIDER, AgentProcess, clean_env, outrider, wait_for
from tests.prometheus_server import free_port
from tests.stored_run import NAN_STEP, STEPS, store_runs


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read(), error.headers


def get_json(url: str) -> Any:
    status, body, _ = get(url)
    assert status == 200, body
    return orjson.loads(body)


def answers(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("dashboard") / "runs"
    store_runs(runs, "first", "second")
    return runs


@pytest.fixture(scope="module")
def board(runs_dir: Path) -> Iterator[str]:
    """`outrider dashboard` over the stored runs, on a free loopback port."""
    port = free_port()
    process = subprocess.Popen(
        [OUTRIDER, "dashboard", "--runs-dir", str(runs_dir), "--bind", f"127.0.0.1:{port}"],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(base + "/api/runs"), 20, "the dashboard to answer")
        yield base
    finally:
        process.terminate()
        process.wait(10)


def test_runs_and_a_run_come_from_the_store(board: str) -> None:
    """The runs list and one run's page data hold what the agent stored."""
    runs = {row["run_id"]: row for row in get_json(board + "/api/runs")["runs"]}
    assert set(runs) == {"first", "second"}
    assert runs["first"]["status"] == "finished"
    assert runs["first"]["last_step"] == STEPS - 1
    run = get_json(board + "/api/run?run=first")
    assert {"loss", "lr", "val/loss"} <= set(run["metrics"])
    assert run["texts"][-1]["text"] == "the quick brown fox"


def test_series_hold_every_point_and_nan_as_a_gap(board: str) -> None:
    """A chart's series has all the run's points (fewer than the buckets), NaN as null."""
    series = get_json(board + "/api/series?run=first&names=loss&names=val/*")["series"]
    loss = series["loss"]
    assert loss["axis"] == "step" and loss["count"] == STEPS
    assert loss["x"] == list(range(STEPS))
    assert loss["y"][NAN_STEP] is None
    assert len(series["val/loss"]["x"]) == 6


def test_compare_and_alerts_answer(board: str) -> None:
    """Compare gives one series per chosen run; the alerts page lists each run's NaN-loss
    alert, none of them active (the runs are finished)."""
    compared = get_json(board + "/api/compare?runs=first&runs=second&metric=loss")["series"]
    assert set(compared) == {"first", "second"}
    alerts = get_json(board + "/api/alerts")
    assert sorted((a["run"], a["name"], a["step"]) for a in alerts["history"]) == [
        ("first", "nonfinite", NAN_STEP),
        ("second", "nonfinite", NAN_STEP),
    ]
    assert alerts["active"] == []
    runs = {row["run_id"]: row for row in get_json(board + "/api/runs")["runs"]}
    assert runs["first"]["alerts"] == {"critical": 1}


def test_export_download_is_the_cli_table(board: str, runs_dir: Path) -> None:
    """The export download is byte for byte what `outrider export` writes."""
    status, body, headers = get(board + "/download/export?run=first&format=csv&metrics=loss")
    assert status == 200
    assert "attachment" in headers["Content-Disposition"]
    cli = outrider("export", "first", "--runs-dir", str(runs_dir), "--metrics", "loss")
    assert body.decode() == cli.stdout


def test_the_report_download_is_the_self_contained_html_report(board: str) -> None:
    """The export page's report: `outrider report`'s page, charts embedded, the alert in it."""
    status, body, headers = get(board + "/download/report?run=first")
    assert status == 200
    assert headers["Content-Disposition"] == 'attachment; filename="first-report.html"'
    page = body.decode()
    assert page.startswith("<!DOCTYPE html>") and "data:image/png;base64," in page
    assert "nonfinite" in page and "Convergence" in page


@pytest.mark.parametrize(
    "path",
    ["/api/run?run=../..", "/api/run?run=nothing", "/api/image?run=first&name=../../run.json"],
)
def test_nothing_outside_the_runs_is_served(board: str, path: str) -> None:
    """Run names and image names cannot reach files outside the run directories."""
    assert get(board + path)[0] == 404


def test_a_million_points_become_a_few_thousand_and_keep_the_spike(tmp_path: Path) -> None:
    """Downsampling on the server: 200,000 steps come back as at most 4 x buckets points,
    and the one spike among them is one of those points."""
    run = tmp_path / "runs" / "long"
    run.mkdir(parents=True)
    (run / "run.json").write_bytes(orjson.dumps({"run_id": "long", "status": "running"}))
    spike = 123_457
    with open(run / "metrics.jsonl", "wb") as lines:
        for step in range(200_000):
            loss = 1000.0 if step == spike else 1.0 + (step % 7) * 0.01
            entry = {
                "kind": "scalars",
                "step": step,
                "rank": 0,
                "t": step,
                "metrics": {"loss": loss},
            }
            lines.write(orjson.dumps(entry) + b"\n")
    port = free_port()
    process = subprocess.Popen(
        [OUTRIDER, "dashboard", "--runs-dir", str(run.parent), "--bind", f"127.0.0.1:{port}"],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(base + "/api/runs"), 20, "the dashboard to answer")
        loss = get_json(base + "/api/series?run=long&names=loss&buckets=500")["series"]["loss"]
        assert loss["count"] == 200_000
        assert len(loss["x"]) <= 2000
        assert spike in loss["x"] and max(loss["y"]) == 1000.0
        zoomed = get_json(base + f"/api/series?run=long&names=loss&lo={spike - 50}&hi={spike + 50}")
        assert zoomed["series"]["loss"]["x"] == list(range(spike - 51, spike + 52))
    finally:
        process.terminate()
        process.wait(10)


def test_each_rank_has_its_own_series(tmp_path: Path) -> None:
    """A run of two ranks lists both; a chart shows one rank's points, rank 0 by default,
    and host samples (rank -1) still show on a page of rank 1."""
    run = tmp_path / "runs" / "ranks"
    run.mkdir(parents=True)
    (run / "run.json").write_bytes(orjson.dumps({"run_id": "ranks", "status": "running"}))
    with open(run / "metrics.jsonl", "wb") as lines:
        for step in range(10):
            for rank in (0, 1):
                entry = {
                    "kind": "scalars",
                    "step": step,
                    "rank": rank,
                    "t": step,
                    "metrics": {"loss": rank * 100.0 + step},
                }
                lines.write(orjson.dumps(entry) + b"\n")
            host = {"kind": "system", "step": None, "rank": -1, "t": step, "cpu_percent": 50.0}
            lines.write(orjson.dumps(host) + b"\n")
    port = free_port()
    process = subprocess.Popen(
        [OUTRIDER, "dashboard", "--runs-dir", str(run.parent), "--bind", f"127.0.0.1:{port}"],
        env=clean_env(),
        stdout=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: answers(base + "/api/runs"), 20, "the dashboard to answer")
        assert get_json(base + "/api/run?run=ranks")["ranks"] == [0, 1]
        first = get_json(base + "/api/series?run=ranks&names=loss")["series"]["loss"]
        assert first["rank"] == 0 and first["y"] == [float(step) for step in range(10)]
        url = base + "/api/series?run=ranks&names=loss&names=system/cpu_percent&rank=1"
        second = get_json(url)["series"]
        assert second["loss"]["y"] == [100.0 + step for step in range(10)]
        assert second["system/cpu_percent"]["axis"] == "time"
        assert len(second["system/cpu_percent"]["y"]) == 10
    finally:
        process.terminate()
        process.wait(10)


def test_the_agent_serves_it_and_stops_it(tmp_path: Path) -> None:
    """`outrider agent --dashboard HOST:PORT` starts the dashboard and stops it at exit."""
    port = free_port()
    agent = AgentProcess(tmp_path, "--dashboard", f"127.0.0.1:{port}")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(base + "/api/runs"), 20, "the agent's dashboard to answer")
        status, body, _ = get(base + "/run?id=whatever")
        assert status == 200 and b"/static/uPlot.iife.min.js" in body
        assert get(base + "/static/uPlot.iife.min.js")[0] == 200
    finally:
        assert agent.stop() == 0
    wait_for(lambda: not answers(base + "/api/runs"), 10, "the dashboard to stop with the agent")


def test_a_taken_port_is_one_warning_and_the_agent_goes_on(tmp_path: Path) -> None:
    """When the port is in use the agent says so once and runs without a dashboard."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        agent = AgentProcess(tmp_path, "--dashboard", f"127.0.0.1:{port}")
        try:
            assert agent.alive
        finally:
            assert agent.stop() == 0
    said = [line for line in agent.stderr().splitlines() if "dashboard" in line]
    assert len(said) == 1 and "dashboard not started" in said[0], agent.stderr()


@pytest.mark.parametrize(
    ("value", "says"),
    [("0.0.0.0:8080", "set a token"), ("somewhere", "is not HOST:PORT, PORT or off")],
)
def test_a_dashboard_address_it_cannot_use_is_a_usage_error(
    tmp_path: Path, value: str, says: str
) -> None:
    """Off loopback without a token, or not an address: a one-line usage error."""
    done = outrider("agent", "--runs-dir", str(tmp_path / "runs"), "--dashboard", value, timeout=30)
    assert done.returncode == 2
    assert says in done.stderr and "Traceback" not in done.stderr


def test_a_token_is_required_when_set(runs_dir: Path) -> None:
    """With a token, requests without it get 401; ?token= (then its cookie) and a bearer
    header get in."""
    port = free_port()
    token = "s3cret-token-123"
    process = subprocess.Popen(
        [OUTRIDER, "dashboard", "--runs-dir", str(runs_dir), "--bind", f"127.0.0.1:{port}"],
        env=clean_env(**{TOKEN_ENV: token}),
        stdout=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _status(base + "/api/runs") == 401, 20, "the dashboard to answer 401")
        status, _, headers = get(f"{base}/?token={token}")
        assert status == 200 and token in headers["Set-Cookie"]
        cookie = headers["Set-Cookie"].split(";")[0]
        assert get(base + "/api/runs", {"Cookie": cookie})[0] == 200
        assert get(base + "/api/runs", {"Authorization": f"Bearer {token}"})[0] == 200
        assert get(base + "/api/runs?token=wrong-token-456")[0] == 401
    finally:
        process.terminate()
        process.wait(10)


def _status(url: str) -> int | None:
    try:
        return get(url)[0]
    except OSError:
        return None


assert os.environ.get("OUTRIDER_DASHBOARD") == "off"  # set by tests/conftest.py


def test_outrider_run_serves_it_and_names_it_in_the_banner(tmp_path: Path) -> None:
    """`outrider run --dashboard` prints the run's page and serves it while the trainer
    runs (the trainer itself fetches its own run from it)."""
    port = free_port()
    trainer = tmp_path / "train.py"
    trainer.write_text(
        "import os, time, urllib.request\n"
        f"url = 'http://127.0.0.1:{port}/api/run?run=' + os.environ['OUTRIDER_RUN_ID']\n"
        "deadline = time.monotonic() + 20\n"
        "while True:\n"
        "    try:\n"
        "        urllib.request.urlopen(url, timeout=5).read()\n"
        "        break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline:\n"
        "            raise SystemExit('the dashboard never answered')\n"
        "        time.sleep(0.1)\n"
    )
    done = outrider(
        "run",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--run-id",
        "banner",
        "--dashboard",
        f"127.0.0.1:{port}",
        "--",
        sys.executable,
        str(trainer),
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert f"dashboard: http://127.0.0.1:{port}/run?id=banner" in done.stderr
