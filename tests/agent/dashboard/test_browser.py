"""The dashboard in a real browser (Playwright driving Debian's chromium, headless): pages
load, charts hold the run's points, a live record arrives, compare and downloads work."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import probe
from tests.helpers import AgentProcess, lines, run_trainer, wait_for
from tests.prometheus_server import free_port
from tests.stored_run import STEPS, TRAINER

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason="needs Debian's chromium package (apt install chromium)"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (dev extra)")

LIVE_STEPS = 50
#: the finished run's points in its "loss" chart: loss less its one NaN, and val/loss
FINISHED_LOSS_POINTS = STEPS - 1 + STEPS // 20


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, str]]:
    """A real agent serving its dashboard on a free port, with one finished run stored."""
    port = free_port()
    agent = AgentProcess(tmp_path, "--dashboard", f"127.0.0.1:{port}")
    done = run_trainer(TRAINER, agent.endpoint, "finished")
    assert done.returncode == 0, done.stderr
    try:
        yield agent, f"http://127.0.0.1:{port}"
    finally:
        agent.stop()


def chart_points(page: Any, title: str) -> int:
    return int(page.evaluate(f"window.outrider.charts[{title!r}].points"))


def new_page(browser: Any) -> Any:
    return browser.new_page(viewport={"width": 1400, "height": 1000})


def open_page(browser: Any, url: str) -> Any:
    page = new_page(browser)
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(url)
    page.wait_for_function("window.outrider && (window.outrider.ready || window.outrider.error)")
    assert page.evaluate("window.outrider.error") is None
    assert errors == []
    return page


def zoom_and_pan(page: Any, title: str) -> None:
    """The wheel zooms the x range, shift-drag moves it keeping its width, a double click
    shows the whole run again."""
    box = page.locator(f"[data-chart='{title}'] .u-over").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    chart = f"window.outrider.charts[{title!r}]"
    whole = page.evaluate(f"[{chart}.plot.scales.x.min, {chart}.plot.scales.x.max]")
    page.mouse.move(x, y)
    for _ in range(4):
        page.mouse.wheel(0, -100)
    page.wait_for_function(f"{chart}.range !== null")
    low, high = page.evaluate(f"{chart}.range")
    assert whole[0] < low < high < whole[1]
    page.keyboard.down("Shift")
    page.mouse.down()
    page.mouse.move(x + 100, y, steps=5)
    page.mouse.up()
    page.keyboard.up("Shift")
    page.wait_for_function(f"{chart}.range[0] < {low}")
    moved = page.evaluate(f"{chart}.range")
    assert moved[1] - moved[0] == pytest.approx(high - low)
    page.mouse.dblclick(x, y)
    page.wait_for_function(f"{chart}.range === null")


def test_a_live_run_its_charts_and_a_new_record(browser: Any, agent: tuple[Any, str]) -> None:
    """The run page of a live run draws its logged points, and a record stored after the
    page opened shows in the chart without a reload."""
    process, base = agent
    assert probe.init(process.endpoint, run_id="live")
    for step in range(LIVE_STEPS):
        probe.log({"loss": 2.0 - step * 0.01, "lr": 1e-3}, step=step)
    assert probe.flush(10.0)
    process.wait_lines("live", LIVE_STEPS)
    page = open_page(browser, base + "/run?id=live")
    page.wait_for_function(f"window.outrider.charts['loss'].points === {LIVE_STEPS}")
    assert chart_points(page, "learning rate") == LIVE_STEPS

    probe.log({"loss": 0.5, "lr": 1e-3}, step=LIVE_STEPS)
    assert probe.flush(10.0)
    page.wait_for_function(
        f"window.outrider.charts['loss'].points === {LIVE_STEPS + 1}", timeout=10_000
    )
    page.wait_for_function("window.outrider.refreshes >= 1")  # drawn by the event, not a reload

    runs = open_page(browser, base + "/")
    assert runs.locator("tr[data-run=live]").count() == 1
    assert runs.locator("tr[data-run=finished]").count() == 1
    assert probe.finish(5.0)


def test_finished_run_compare_alerts_and_downloads(browser: Any, agent: tuple[Any, str]) -> None:
    """A finished run's charts hold all its points and zoom and pan, its NaN alert is on the
    timeline, compare draws the metric of two runs, and the CSV and JSON downloads are the
    run's table."""
    process, base = agent
    assert probe.init(process.endpoint, run_id="other")
    for step in range(10):
        probe.log({"loss": 1.0}, step=step)
    assert probe.flush(10.0)
    process.wait_lines("other", 10)

    page = open_page(browser, base + "/run?id=finished")
    # loss has one NaN (a gap, not a point); val/loss is logged every 20 steps
    assert chart_points(page, "loss") == FINISHED_LOSS_POINTS
    # the alert is stored by the agent's analysis thread, maybe after the page opened: live
    page.locator("#alert-timeline tr").nth(1).wait_for()
    assert page.locator("#alert-timeline tr").count() == 2  # a header and the nonfinite alert
    zoom_and_pan(page, "loss")
    with page.expect_download() as download:
        page.click("a[data-download=csv]")
    rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
    assert rows[0][:3] == ["step", "rank", "time"] and len(rows) == STEPS + 1

    compare = open_page(browser, base + "/compare?runs=finished&runs=other&metric=loss")
    compare.wait_for_function("window.outrider.charts['compare loss'].points > 0")
    assert chart_points(compare, "compare loss") == STEPS - 1 + 10

    export = open_page(browser, base + "/export?run=finished")
    export.select_option("select[name=format]", "json")
    export.fill("input[name=metrics]", "loss")
    export.dispatch_event("input[name=metrics]", "input")
    with export.expect_download() as download:
        export.click("#export-link")
    rows = orjson.loads(Path(download.value.path()).read_bytes())
    assert len(rows) == STEPS and set(rows[0]) == {"step", "rank", "time", "loss"}

    alerts = open_page(browser, base + "/alerts")
    alerts.locator("#alert-history tr").nth(1).wait_for()
    assert alerts.locator("#alert-history tr").count() == 2
    assert probe.finish(5.0)


def test_a_line_stored_while_the_page_connects_still_shows(
    browser: Any, agent: tuple[Any, str]
) -> None:
    """A line stored after the page's first fetch but before its event stream connects sends
    no 'grown' (the server counts growth from the connection on): the page draws once more
    when the stream connects, so a finished run's late line shows without a reload."""
    process, base = agent
    run_dir = process.run_dir("finished")
    losses = wait_for(
        lambda: [x for x in lines(run_dir) if "loss" in x.get("metrics", {})],
        10,
        "the finished run's losses",
    )
    last = losses[-1]
    late = {**last, "step": STEPS + 5, "metrics": {"loss": 0.25}}
    page = new_page(browser)

    def connect(route: Any) -> None:  # the page has drawn; its stream is not connected yet
        if route.request.url.startswith(base + "/api/events"):
            with (run_dir / "metrics.jsonl").open("ab") as out:
                out.write(orjson.dumps(late) + b"\n")
        route.continue_()

    page.route("**/api/events*", connect)
    page.goto(base + "/run?id=finished")
    page.wait_for_function(f"window.outrider.charts['loss'].points === {FINISHED_LOSS_POINTS + 1}")
    assert page.evaluate("window.outrider.refreshes") == 0  # no growth after the connection
