"""``outrider simulate`` end to end: the synthetic trainer through the real probe into a real
agent, and the built-in alert each failure is meant to raise read back from alerts.jsonl."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from agent.failures import FAILURES
from tests.helpers import clean_env, outrider

#: the rules that wait for minutes shortened, no maps or dashboards (CPU the rules do not
#: need), as the failure suite runs its agents; and statistics workers that are neither capped
#: at 1% of a core nor SCHED_IDLE: on a busy shared machine those compute one feature batch of
#: the few a run of seconds has, and a collapse seen only after the run ended is not judged
AGENT_CONFIG = """\
stats:
  cpu_share: 0
  idle: false
  feature_map: "off"
  dashboard_seconds: 0
alerts:
  rules:
    stalled:
      after_seconds: 3
"""

#: steps per second per failure: 200 unless the agent needs the run to last longer.
#: The feature statistics come from a worker process that takes a second or two to start;
#: a collapse seen only after the run ended is not judged, so that run lasts ~5 s.
PACE = {"collapse": 60}

SEVERE = ("warning", "error", "critical")


def simulate(tmp_path: Path, failure: str) -> tuple[list[dict[str, object]], str]:
    config = tmp_path / "agent.yaml"
    config.write_text(AGENT_CONFIG)
    result = outrider(
        "simulate",
        "--failure",
        failure,
        "--steps",
        "300",
        "--steps-per-second",
        str(PACE.get(failure, 200)),
        "--sinks",
        "none",
        "--config",
        str(config),
        "--runs-dir",
        str(tmp_path / "runs"),
        "--run-id",
        "sim",
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    path = tmp_path / "runs" / "sim" / "alerts.jsonl"
    text = path.read_bytes() if path.exists() else b""
    return [orjson.loads(line) for line in text.splitlines() if line], result.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "failure", [name for name, f in FAILURES.items() if f.raises and f.ranks == 1]
)
def test_failure_raises_its_alert(tmp_path: Path, failure: str) -> None:
    """Each simulated failure fires the built-in alert its --help names, at or after --at."""
    alerts, stderr = simulate(tmp_path, failure)
    expected = FAILURES[failure].raises
    fired = [(a["name"], a["step"]) for a in alerts]
    matching = [a for a in alerts if a["name"] == expected]
    assert matching, f"{expected} did not fire; fired {fired}\n{stderr[-2000:]}"
    step = matching[0]["step"]
    assert step is None or (isinstance(step, int) and step >= 150), fired


@pytest.mark.slow
def test_healthy_run_raises_no_warning(tmp_path: Path) -> None:
    """The healthy simulation raises no alert of severity warning or above."""
    alerts, _ = simulate(tmp_path, "healthy")
    assert [a["name"] for a in alerts if a["severity"] in SEVERE] == []


def test_help_names_every_failure_and_its_alert() -> None:
    """--help lists each failure with the alert it should raise, and says stall takes long."""
    result = outrider("simulate", "--help", env=clean_env())
    assert result.returncode == 0, result.stderr
    for name, failure in FAILURES.items():
        assert name in result.stdout
        assert (failure.raises or "no warning") in result.stdout
    assert "after_seconds" in result.stdout


def test_failure_step_past_the_run_is_a_usage_error(tmp_path: Path) -> None:
    """--at beyond --steps is refused with a message, before any agent starts."""
    result = outrider("simulate", "--failure", "nan", "--steps", "10", "--at", "10", cwd=tmp_path)
    assert result.returncode == 2
    assert "--at" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "outrider-runs").exists()


#: a job's windows of 10 steps, so that the straggler is judged within the short run
JOB_CONFIG = """\
stats: {window_steps: 10, feature_map: "off", dashboard_seconds: 0}
system: {enabled: false}
aggregation: {window_wait_seconds: 5, accounting_seconds: 1, heartbeat_seconds: 0.5}
"""


@pytest.mark.slow
def test_straggler_runs_a_job_whose_aggregator_names_the_slow_rank(tmp_path: Path) -> None:
    """--failure straggler: 4 rank processes under 2 node agents forwarding to a job
    aggregator; the last rank's compute slows at step 30 and the job view's straggler alert
    names it (and only it), with the command that shows the job view."""
    config = tmp_path / "agent.yaml"
    config.write_text(JOB_CONFIG)
    runs = tmp_path / "runs"
    result = outrider(
        "simulate", "--failure", "straggler", "--steps", "120", "--steps-per-second", "50",
        "--at", "30", "--sinks", "none", "--config", str(config), "--runs-dir", str(runs),
        "--run-id", "job", cwd=tmp_path, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"outrider show jobs/job --runs-dir {runs}" in result.stderr
    alerts = [orjson.loads(line) for line in (runs / "jobs" / "job" / "alerts.jsonl").open("rb")]
    stragglers = [a for a in alerts if a["name"] == "straggler"]
    assert stragglers, [a["name"] for a in alerts]
    assert {(a["rank"], a["attrs"]["host"]) for a in stragglers} == {(3, "node1")}
    assert stragglers[0]["step"] >= 30
    info = orjson.loads((runs / "jobs" / "job" / "run.json").read_bytes())
    assert sorted(r["rank"] for r in info["job"]["ranks"]) == [0, 1, 2, 3]
    assert info["job"]["stragglers"] == [3]
    assert (runs / "job").is_dir() and (runs / "nodes" / "node1" / "job").is_dir()


def test_ranks_belong_to_the_straggler_job_only(tmp_path: Path) -> None:
    """--ranks with a one-process failure, or a straggler of one rank, is a usage error."""
    for failure, ranks in (("spike", "4"), ("straggler", "1")):
        result = outrider("simulate", "--failure", failure, "--ranks", ranks, cwd=tmp_path)
        assert result.returncode == 2 and "--ranks" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "outrider-runs").exists()
