"""The failure suite's quick selection (bench/failure_suite.py --quick): real trainers
broken on purpose under real agents, and healthy ones that must stay quiet."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.failures.report import Score, score
from bench.failures.runner import run_suite
from bench.failures.scenarios import QUICK, SCENARIOS

#: failures whose expected rule (bench/failures/scenarios.py EXPECTED_RULES) must catch
#: them; a scenario named here and not in QUICK is run as well
CAUGHT = (
    "nan",
    "spike",
    "stall",
    "death",
    "leak",
    "divergence",
)

pytestmark = [pytest.mark.slow, pytest.mark.serial, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def scores(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Score]:
    names = list(dict.fromkeys([*QUICK, *CAUGHT]))
    workdir: Path = tmp_path_factory.mktemp("failure-suite")
    # All at once: the runs are paced (25 ms steps, a hang) and mostly wait, so the length
    # is about their longest run's (64 s, against 90 s four at a time in two waves).
    results = run_suite([SCENARIOS[name] for name in names], workdir, jobs=len(names))
    return {result.scenario.name: score(result) for result in results}


@pytest.mark.parametrize("name", CAUGHT)
def test_failure_is_caught_by_its_rule(scores: dict[str, Score], name: str) -> None:
    """The rule meant for the failure fires at or after its onset, and nothing cries wolf."""
    verdict = scores[name]
    result = verdict.result
    alerts = [(a.name, a.severity, a.step) for a in result.alerts]
    assert result.error is None, result.error
    assert verdict.caught, f"{name}: none of {result.scenario.expected} fired: {alerts}"
    assert not verdict.false_alarms, f"{name}: false alarms {verdict.false_alarms}"


#: healthy runs on which a rule is known to cry wolf today, and why
KNOWN_FALSE_ALARMS: dict[str, str] = {}
HEALTHY = [
    pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=KNOWN_FALSE_ALARMS[name]))
    if name in KNOWN_FALSE_ALARMS
    else name
    for name in QUICK
    if SCENARIOS[name].healthy
]


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_run_raises_no_warning(scores: dict[str, Score], name: str) -> None:
    """Healthy training runs to its end and raises no alert of severity warning or above."""
    verdict = scores[name]
    result = verdict.result
    assert result.exit_status == 0, f"{name} exited {result.exit_status}"
    assert result.last_step == result.scenario.steps - 1
    assert not verdict.false_alarms, f"{name}: {verdict.false_alarms}"
