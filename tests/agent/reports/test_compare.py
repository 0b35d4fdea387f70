"""`outrider compare` on runs a real agent stored: best and final values, config
differences, curves in the terminal, in one self-contained HTML page and in JSON."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.reports.compare import rule_for
from tests.agent.reports.conftest import RUNS, expected_loss
from tests.helpers import outrider


def compare(stored: dict[str, Any], *args: str) -> Any:
    return outrider("compare", *args, "--runs-dir", str(stored["runs"]))


def test_json_gives_best_and_final_per_run_and_the_config_difference(
    stored: dict[str, Any],
) -> None:
    """Loss is best at its minimum, accuracy at its maximum, lr has no best; only lr differs."""
    done = compare(stored, "lr-small", "lr-large", "--json")
    assert done.returncode == 0, done.stderr
    result = orjson.loads(done.stdout)
    assert [run["run_id"] for run in result["runs"]] == ["lr-small", "lr-large"]
    for run, (_lr, steps) in RUNS.items():
        loss = result["metrics"]["loss"]["runs"][run]
        assert loss["best_step"] == steps - 2
        assert loss["best"] == pytest.approx(expected_loss(run, steps - 2))
        assert (loss["final_step"], loss["count"]) == (steps - 1, steps)
        assert loss["final"] == pytest.approx(expected_loss(run, steps - 1))
        acc = result["metrics"]["val/acc"]["runs"][run]
        assert (acc["best"], acc["best_step"]) == (pytest.approx((steps - 1) / steps), steps - 1)
    assert result["metrics"]["loss"]["rule"] == "min"
    assert result["metrics"]["val/acc"]["rule"] == "max"
    assert result["metrics"]["lr"]["rule"] == "none"
    assert result["metrics"]["lr"]["runs"]["lr-small"]["best"] is None
    assert result["config_diff"] == {
        "lr": {"lr-small": 0.01, "lr-large": 0.1},
        "steps": {"lr-small": 40, "lr-large": 30},
    }


def test_table_names_the_rule_and_html_is_one_self_contained_page(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    """The terminal table has best/final and a curve per run; the HTML page embeds one PNG
    per metric and fetches nothing."""
    page = tmp_path / "compare.html"
    done = compare(stored, "lr-small", "lr-large", "--metrics", "loss,val/*", "--html", str(page))
    assert done.returncode == 0, done.stderr
    assert "best = min for loss-like names" in done.stdout
    [small] = [line for line in done.stdout.splitlines() if line.lstrip().startswith("loss (min)")]
    assert "lr-small" in small and re.search(r"[▁▂▃▄▅▆▇█]{10,}", small)
    assert "lr " in done.stdout and "0.01" in done.stdout  # the config difference
    assert "grad_norm" not in done.stdout
    text = page.read_text()
    images = re.findall(r"src='data:image/png;base64,([^']+)'", text)
    assert len(images) == 2  # loss and val/acc
    assert all(base64.b64decode(image).startswith(b"\x89PNG") for image in images)
    assert "<script" not in text and not re.search(r"(src|href)=['\"]?https?:", text)


def test_unknown_and_single_runs_fail_clearly(stored: dict[str, Any]) -> None:
    """An unknown run, a lone run or an empty metric selection is one line, not a traceback."""
    for args, message in (
        (("lr-small", "nope"), "no run 'nope'"),
        (("lr-small",), "at least two runs"),
        (("lr-small", "lr-large", "--metrics", "missing*"), "no metrics matching missing*"),
    ):
        done = compare(stored, *args)
        assert done.returncode != 0
        assert message in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("loss", "min"),
        ("val/loss", "min"),
        ("train/perplexity", "min"),
        ("step_time_seconds/p99", "min"),
        ("val/acc", "max"),
        ("top1_accuracy", "max"),
        ("tokens_per_second", "max"),
        ("lr", "none"),
        ("grad_norm", "none"),
    ],
)
def test_best_rule_follows_the_name(name: str, rule: str) -> None:
    """Loss-like names are best low, accuracy-like ones high, the rest have no best."""
    assert rule_for(name) == rule


def test_html_page_renders_offline_in_a_real_browser(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    """Headless chromium shows the page with the network cut off: every curve image
    decodes, the tables hold the runs, and the page asked for nothing but itself."""
    from playwright.sync_api import Route, sync_playwright

    page_file = tmp_path / "compare.html"
    done = compare(stored, "lr-small", "lr-large", "--html", str(page_file))
    assert done.returncode == 0, done.stderr
    requested: list[str] = []

    def only_the_file(route: Route) -> None:
        requested.append(route.request.url)
        if route.request.url.startswith("file:"):
            route.continue_()
        else:
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", headless=True)
        try:
            page = browser.new_page()
            page.route("**/*", only_the_file)
            page.goto(page_file.as_uri())
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.alt, e.complete && e.naturalWidth])"
            )
            text = page.inner_text("body")
        finally:
            browser.close()
    assert {"grad_norm", "loss", "lr", "val/acc"} <= {alt for alt, _ in images}
    assert images and all(width == 640 for _, width in images)
    assert "lr-small" in text and "lr-large" in text and "Config differences" in text
    assert requested == [page_file.as_uri()]
