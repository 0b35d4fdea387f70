"""``outrider report`` on a real stored run: `outrider simulate --failure spike` through the
real probe and agent, then the report's HTML, PNGs, JSON and errors, and the page in Chromium."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from agent.reports.report import SECTIONS, build, html, render_charts, render_html
from tests.helpers import PYTHON, outrider

#: the rules' and statistics' CPU kept to what the run needs, as tests/agent/cli/test_simulate.py
AGENT_CONFIG = """\
stats:
  cpu_share: 0
  idle: false
  feature_map: "off"
  dashboard_seconds: 0
"""
PNG = b"\x89PNG\r\n\x1a\n"
CHARTS = ("progress", "validation", "resources", "convergence")
SPIKE_AT = 150


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 300-step simulated run whose loss spikes x20 at step 150, stored as run `sim`."""
    base = tmp_path_factory.mktemp("report")
    config = base / "agent.yaml"
    config.write_text(AGENT_CONFIG)
    result = outrider(
        "simulate",
        "--failure",
        "spike",
        "--at",
        str(SPIKE_AT),
        "--steps",
        "300",
        "--steps-per-second",
        "200",
        "--sinks",
        "none",
        "--config",
        str(config),
        "--runs-dir",
        str(base / "runs"),
        "--run-id",
        "sim",
        cwd=base,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    yield base / "runs"


@pytest.mark.slow
def test_report_writes_a_self_contained_page_and_its_pngs(runs: Path, tmp_path: Path) -> None:
    """report.html has every section, the alert, and each PNG embedded byte for byte."""
    out = tmp_path / "out"
    result = outrider("report", "sim", "--runs-dir", str(runs), "--out", str(out))
    assert result.returncode == 0, result.stderr
    for name in ("report.html", *(f"{chart}.png" for chart in CHARTS)):
        assert name in result.stdout
    page = (out / "report.html").read_text()
    for key, title in SECTIONS:
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    embedded = [
        base64.b64decode(data) for data in re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    ]
    assert embedded == [(out / f"{chart}.png").read_bytes() for chart in CHARTS]
    assert all(png.startswith(PNG) for png in embedded)
    assert not re.search(r"<script|<link|src=\"(?!data:)|url\(", page)  # nothing to fetch
    alerts = page[page.index('id="alerts"') : page.index('id="convergence"')]
    assert "loss_spike" in alerts and "step 150" in alerts
    assert "RECOMMENDATIONS" in result.stdout and "Loss spikes that recovered" in result.stdout


@pytest.mark.slow
def test_report_json_has_the_figures(runs: Path, tmp_path: Path) -> None:
    """--json: the spike found at its step by the analysis and the alert, the recommendation
    with its numbers, what the run did not log, and the files written."""
    out = tmp_path / "json-out"
    result = outrider("report", "sim", "--runs-dir", str(runs), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert report["run_id"] == "sim" and report["summary"]["status"] == "finished"
    assert report["summary"]["last_step"] == 299
    convergence = report["convergence"]
    assert convergence["metric"] == "loss" and convergence["points"] == 300
    assert convergence["spike_steps"] == [SPIKE_AT]
    assert 0.4 < convergence["reduction"] < 0.8
    assert convergence["per_1k_steps"] > 0 and convergence["per_minute"] > 0
    assert report["alerts"]["by_name"] == {"loss_spike": 1}
    rules = {r["rule"]: r for r in report["recommendations"]}
    assert rules["loss_spikes"]["figures"]["spike_steps"] == [SPIKE_AT]
    assert not rules.keys() & {"lr_too_high", "input_bound", "nonfinite"}
    assert report["validation"]["best"]["evaluations"] == 6
    assert any("data_wait_seconds" in note for note in report["missing"]["resources"])
    assert sorted(Path(f).name for f in report["files"]) == sorted(
        ["report.html", *(f"{chart}.png" for chart in CHARTS)]
    )


@pytest.mark.slow
def test_render_html_page_loads_offline_in_chromium(runs: Path, tmp_path: Path) -> None:
    """render_html (what the dashboard serves) in a real browser: every chart decodes, every
    section shows, and the page asks for nothing beyond itself."""
    from playwright.sync_api import sync_playwright

    path = tmp_path / "report.html"
    path.write_text(render_html(runs / "sim"))
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox"]
        )
        try:
            page = browser.new_page()
            requests: list[str] = []
            page.on("request", lambda request: requests.append(request.url))
            page.goto(path.as_uri())
            widths = page.evaluate("Array.from(document.images).map(i => i.naturalWidth)")
            headings = page.evaluate(
                "Array.from(document.querySelectorAll('section h2')).map(h => h.textContent)"
            )
        finally:
            browser.close()
    assert len(widths) == len(CHARTS) and all(width > 0 for width in widths)
    assert headings == [title for _, title in SECTIONS]
    assert requests == [path.as_uri()]


@pytest.mark.slow
def test_report_errors_are_one_line(runs: Path, tmp_path: Path) -> None:
    """An unknown run and an out dir that cannot be made: one line each, exit 1."""
    unknown = outrider("report", "nope", "--runs-dir", str(runs))
    assert unknown.returncode == 1
    assert unknown.stderr.strip().splitlines() == [
        f"Error: no run 'nope' in {runs} (see `outrider runs`)"
    ]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    unwritable = outrider("report", "sim", "--runs-dir", str(runs), "--out", str(blocker / "x"))
    assert unwritable.returncode == 1
    lines = unwritable.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: cannot write the report to {blocker}")


def test_report_help_names_the_sections_and_options() -> None:
    """`outrider report --help` says what the report holds and where it goes."""
    done = outrider("report", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Usage: outrider report [OPTIONS] RUN")
    for words in ("convergence analysis", "recommendations", "--out", "--json", "--runs-dir"):
        assert words in done.stdout


def test_report_of_a_job_view_names_the_straggler(tmp_path: Path) -> None:
    """A job view (`jobs/<id>`, as the aggregator stores it: its scalars on rank -1, the
    stragglers in run.json's `job`): the job's loss is analysed and the straggler named."""
    view = tmp_path / "runs" / "jobs" / "job7"
    view.mkdir(parents=True)
    job = {
        "ranks": [
            {"rank": 0, "host": "node0", "relative_score": 1.0, "straggler": False},
            {"rank": 5, "host": "node1", "relative_score": 0.58, "straggler": True},
        ],
        "stragglers": [5],
    }
    info = {"run_id": "job7", "start_time": 1000.0, "end_time": 1100.0, "status": "finished"}
    (view / "run.json").write_bytes(orjson.dumps({**info, "job": job}))
    lines = [
        {"kind": "scalars", "step": step, "rank": -1, "t": 1000.0 + step, "stream": "agent",
         "metrics": {"job/loss/mean": 4.0 - step / 50}}
        for step in range(99, 100 * 99, 100)
    ]  # fmt: skip
    (view / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))
    done = outrider(
        "report", "jobs/job7", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "o"),
        "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    assert report["convergence"]["metric"] == "job/loss/mean"
    assert report["convergence"]["points"] == 99
    straggler = next(r for r in report["recommendations"] if r["rule"] == "straggler")
    assert straggler["figures"]["ranks"] == [5] and "rank 5 on node1" in straggler["finding"]


def test_a_run_without_data_still_has_every_section_saying_what_to_log(tmp_path: Path) -> None:
    """run.json alone: every section is there, each missing piece says how to log it, and
    the JSON is plain data."""
    (tmp_path / "run.json").write_bytes(orjson.dumps({"run_id": "bare", "status": "running"}))
    report = build(tmp_path)
    page = html(report, render_charts(report))
    for key, title in SECTIONS:
        assert f'<section id="{key}"><h2>{title}</h2>' in page
    assert "<code>probe.log({&#x27;loss&#x27;: loss}, step=step)</code>" in page
    assert "probe.evaluate_lm" in page and "no system samples" in page
    assert "No alerts fired" in page and "Nothing to change" in page
    data = orjson.loads(orjson.dumps(report.as_dict()))
    assert data["convergence"] == {"metric": None}
    assert set(data["missing"]) == {"progress", "validation", "resources", "convergence"}


#: a real trainer whose loader takes 20 ms a batch against a step of well under a millisecond
INPUT_BOUND_TRAINER = """\
import time
import torch
import probe

def slow_loader(batches):
    for _ in range(batches):
        time.sleep(0.02)
        yield torch.randn(8, 16), torch.randn(8, 1)

probe.init()
model = torch.nn.Linear(16, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
watcher = probe.watch(model, optimizer)
for step, (x, y) in enumerate(watcher.data(slow_loader(60))):
    loss = torch.nn.functional.mse_loss(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    probe.log({"loss": loss.detach()}, step=step)
"""


@pytest.mark.slow
@pytest.mark.serial  # the advice reads the host's CPU load: the other worker's would change it
def test_input_bound_trainer_gets_the_loader_recommendation(tmp_path: Path) -> None:
    """A real torch trainer under `outrider run`, its batches slow to arrive: the data wait
    probe.watch stored makes the report recommend more loader workers, with the share."""
    (tmp_path / "train.py").write_text(INPUT_BOUND_TRAINER)
    (tmp_path / "agent.yaml").write_text(AGENT_CONFIG)
    runs = tmp_path / "runs"
    ran = outrider(
        "run", "--runs-dir", str(runs), "--run-id", "slow", "--config", "agent.yaml",
        "--require-agent", "--", PYTHON, "train.py",
        cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    done = outrider("report", "slow", "--runs-dir", str(runs), "--json")
    assert done.returncode == 0, done.stderr
    report = orjson.loads(done.stdout)
    rules = {r["rule"]: r for r in report["recommendations"]}
    loader = rules["input_bound"]
    assert loader["figures"]["rank"] == 0 and loader["figures"]["data_wait_share"] > 0.5
    assert "num_workers" in loader["action"]
    assert report["resources"]["data_wait_share"]["0"] > 0.5
