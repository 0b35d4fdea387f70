"""Score the suite's runs per rule and per scenario, print the tables, write the JSON.

A failure is *caught* by the first alert of one of its expected rules at or
after the onset step; the latency is that alert's step minus the onset. A
*false alarm* is an alert of severity warning or above on a healthy run, on a
run after which training recovers (the spike: any rule but the spike and
gradient ones), or an expected rule's alert before its failure's onset.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench._common import machine, print_table
from bench.failures.runner import ROOT, SEVERE, Alert, RunResult
from bench.failures.scenarios import AGENT_CONFIG, EXPECTED_RULES, RECOVERS, STEP_SECONDS


@dataclass
class Detection:
    rule: str | None
    step: int | None
    latency_steps: int | None
    latency_seconds: float | None


@dataclass
class Score:
    """One run's verdict."""

    result: RunResult
    detection: Detection | None  # None: a healthy run
    false_alarms: list[Alert] = field(default_factory=list)

    @property
    def caught(self) -> bool:
        return self.detection is not None and self.detection.rule is not None


def builtin_rules() -> set[str]:
    from agent.alerts.config import BUILTIN_RULES

    return set(BUILTIN_RULES)


def score(result: RunResult) -> Score:
    scenario = result.scenario
    severe = [alert for alert in result.alerts if alert.severity in SEVERE]
    if scenario.healthy:
        return Score(result, None, severe)
    onset = result.onset_step if result.onset_step is not None else scenario.onset
    expected = set(scenario.expected)
    hits = [a for a in result.alerts if a.name in expected]
    early = [a for a in hits if not a.after(onset, result.onset_t) and a.severity in SEVERE]
    late = sorted((a for a in hits if a.after(onset, result.onset_t)), key=lambda a: a.t)
    false_alarms = list(early)
    if scenario.failure in RECOVERS:
        allowed = RECOVERS[scenario.failure]
        false_alarms += [a for a in severe if a.name not in allowed and a not in early]
    if not late:
        return Score(result, Detection(None, None, None, None), false_alarms)
    first = late[0]
    steps = max(0, first.step - onset) if first.step is not None else None
    seconds = first.t - result.onset_t if result.onset_t is not None else None
    return Score(result, Detection(first.name, first.step, steps, seconds), false_alarms)


def rule_rows(scores: Sequence[Score]) -> list[dict[str, Any]]:
    """Per rule: failures caught of those it should catch, latency, false alarms."""
    known = builtin_rules()
    rules: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        return rules.setdefault(
            name,
            {
                "rule": name,
                "exists": name in known,
                "should": [],
                "caught": [],
                "latency": [],
                "false_alarms": [],
            },
        )

    for failure, names in EXPECTED_RULES.items():
        for name in names:
            for s in scores:
                if s.result.scenario.failure == failure:
                    row(name)["should"].append(s.result.scenario.name)
    for s in scores:
        if s.detection is not None and s.detection.rule is not None:
            entry = row(s.detection.rule)
            entry["caught"].append(s.result.scenario.name)
            if s.detection.latency_steps is not None:
                entry["latency"].append(s.detection.latency_steps)
        for alert in s.false_alarms:
            row(alert.name)["false_alarms"].append(f"{s.result.scenario.name}@{alert.step}")
    return sorted(rules.values(), key=lambda r: (not r["should"], r["rule"]))


def _latency(values: Sequence[int]) -> tuple[str, str]:
    if not values:
        return "-", "-"
    return f"{statistics.median(values):g}", str(max(values))


def print_tables(scores: Sequence[Score]) -> None:
    healthy = [s for s in scores if s.result.scenario.healthy]
    print(f"\nper rule ({len(healthy)} healthy runs; latency in steps from the onset)\n")
    rows = []
    for r in rule_rows(scores):
        median, worst = _latency(r["latency"])
        caught = f"{len(r['caught'])}/{len(r['should'])}" if r["should"] else "-"
        if not r["exists"]:
            caught += " (no such rule)"
        alarms = r["false_alarms"]
        rows.append([r["rule"], caught, median, worst, str(len(alarms)), " ".join(alarms) or "-"])
    print_table(["rule", "caught", "median", "max", "false alarms", "where (run@step)"], rows)

    print("\nper scenario\n")
    rows = []
    for s in scores:
        res, scenario = s.result, s.result.scenario
        if s.detection is None:
            verdict = "healthy" if not s.false_alarms else "FALSE ALARM"
            onset = "-"
        else:
            onset = str(res.onset_step)
            d = s.detection
            if d.rule is None:
                verdict = f"MISSED ({'/'.join(scenario.expected)})"
            else:
                secs = f", {d.latency_seconds:.1f} s" if d.latency_seconds is not None else ""
                verdict = f"{d.rule} +{d.latency_steps} steps{secs}"
                doubled = res.doubled_step
                if scenario.failure == "divergence" and doubled is not None and d.step is not None:
                    verdict += f" ({d.step - doubled:+d} from the loss doubling)"
        if res.error:
            verdict += f" [{res.error}]"
        rows.append([scenario.name, scenario.setup(), onset, verdict, _first_alerts(res.alerts)])
    print_table(["scenario", "setup", "onset", "detected", "alerts (first of each)"], rows)


def _first_alerts(alerts: Sequence[Alert]) -> str:
    first: dict[str, Alert] = {}
    for alert in sorted(alerts, key=lambda a: a.t):
        first.setdefault(alert.name, alert)
    return " ".join(f"{a.name}@{a.step}" for a in first.values()) or "-"


def environment() -> dict[str, Any]:
    import torch

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "machine": machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "step_seconds": STEP_SECONDS,
        "agent_config": AGENT_CONFIG,
    }


def as_json(scores: Sequence[Score], wall_seconds: float) -> dict[str, Any]:
    return {
        "environment": environment(),
        "wall_seconds": round(wall_seconds, 1),
        "rules": rule_rows(scores),
        "runs": [
            {
                **s.result.as_dict(),
                "detection": vars(s.detection) if s.detection is not None else None,
                "false_alarms": [vars(a) for a in s.false_alarms],
            }
            for s in scores
        ],
    }
