"""Straggler detection on synthetic job windows: scores, streaks, episodes, wait signature."""

from __future__ import annotations

import random
from typing import Any

import pydantic
import pytest

from agent.aggregation.config import StragglerSettings
from agent.aggregation.findings import straggler_alert
from agent.aggregation.stragglers import StragglerDetector, StragglerFinding
from agent.aggregation.windows import JobWindow
from tests.agent.aggregation.factory import job_window
from tests.agent.alerts.helpers import make

RANKS = 8
FORWARD = 0.100  # seconds, every rank's usual forward time


def ddp_window(
    index: int,
    forward: dict[int, float],
    rng: random.Random | None = None,
    *,
    backward: bool = False,
    noise: float = 0.03,
) -> JobWindow:
    """A DDP window: each rank's forward time (times noise); step times all the same, set by
    the slowest rank; backward times = the all-reduce wait for the slowest rank, plus work."""
    rng = rng or random.Random(index)
    times = {r: f * (1 + rng.gauss(0, noise)) for r, f in forward.items()}
    slowest = max(times.values())
    per_rank: dict[int, dict[str, Any]] = {}
    derived: dict[int, dict[str, float]] = {}
    for rank, seconds in times.items():
        per_rank[rank] = {"forward_seconds": seconds, "loss": 2.0}
        if backward:
            per_rank[rank]["backward_seconds"] = 0.2 + (slowest - seconds)
        derived[rank] = {"step_time_seconds/p50": slowest + 0.2}
    return job_window(index, per_rank, derived)


def even(scale: dict[int, float] | None = None) -> dict[int, float]:
    return {rank: FORWARD * (scale or {}).get(rank, 1.0) for rank in range(RANKS)}


def test_a_slow_rank_is_flagged_after_exactly_consecutive_windows() -> None:
    """Rank 5's forward 1.6x the others': flagged in its 3rd slow window, not before, once."""
    detector = StragglerDetector()
    rng = random.Random(1)
    for index in range(5):
        assert detector.judge(ddp_window(index, even(), rng)) == []
    got: list[list[StragglerFinding]] = [
        detector.judge(ddp_window(index, even({5: 1.6}), rng)) for index in range(5, 15)
    ]
    assert [len(findings) for findings in got] == [0, 0, 1, 0, 0, 0, 0, 0, 0, 0]
    finding = got[2][0]
    assert (finding.rank, finding.host, finding.local_rank) == (5, "node1", 1)
    assert finding.section == "forward_seconds" and finding.index == 7
    assert finding.relative < 0.75 and finding.reason in ("relative", "both")
    assert finding.relative == pytest.approx(1 / 1.6, rel=0.15)


def test_no_finding_without_a_slowdown_over_50_noisy_windows() -> None:
    """Ranks with 5% noise in their forward times: no straggler in 50 windows."""
    detector = StragglerDetector()
    rng = random.Random(7)
    found = [detector.judge(ddp_window(i, even(), rng, noise=0.05)) for i in range(50)]
    assert sum(len(f) for f in found) == 0
    scores = detector.scores(ddp_window(50, even(), rng, noise=0.05))
    assert min(min(pair) for pair in scores.values()) > 0.75


def test_a_rank_that_recovers_and_slows_again_is_flagged_twice() -> None:
    """One finding per episode: slow, recovered, slow again gives two findings."""
    detector = StragglerDetector()
    rng = random.Random(3)
    plan = [1.0] * 3 + [1.8] * 5 + [1.0] * 3 + [1.8] * 4
    flagged = []
    for index, scale in enumerate(plan):
        for finding in detector.judge(ddp_window(index, even({2: scale}), rng)):
            flagged.append((finding.index, finding.rank))
    assert flagged == [(5, 2), (13, 2)]


def test_a_job_that_slows_down_as_a_whole_has_no_straggler() -> None:
    """Step time only (every rank alike): individual scores fall to 0.5, relative stays 1,
    and nobody is blamed: a slower job is not a straggler."""
    detector = StragglerDetector()
    findings: list[StragglerFinding] = []
    for index in range(12):
        step_time = 0.2 if index < 6 else 0.4  # every rank twice as slow from window 6
        window = job_window(
            index,
            {rank: {"loss": 2.0} for rank in range(4)},
            {rank: {"step_time_seconds/p50": step_time} for rank in range(4)},
        )
        findings.extend(detector.judge(window))
        scores = detector.scores(window)
        assert all(relative == 1.0 for relative, _ in scores.values())
    assert all(individual < 0.51 for _, individual in scores.values())
    assert findings == []


def test_individual_score_flags_a_rank_that_slows_down_behind_the_others() -> None:
    """Rank 2 goes from 0.20 s to 0.26 s (relative 0.78, above 0.75) while the others stay:
    its individual score (0.77 -> 0.69 as it slows further) flags it, with reason individual."""
    detector = StragglerDetector()
    findings: list[StragglerFinding] = []
    for index in range(12):
        slow = 0.2 if index < 4 else 0.29
        window = job_window(
            index,
            {rank: {"loss": 2.0} for rank in range(4)},
            {rank: {"step_time_seconds/p50": slow if rank == 2 else 0.23} for rank in range(4)},
        )
        findings.extend(detector.judge(window))
    assert [(f.rank, f.index, f.reason) for f in findings] == [(2, 6, "individual")]


def test_the_first_section_every_rank_has_is_used() -> None:
    """compute_seconds when every rank has it; else forward_seconds; else step time p50."""
    detector = StragglerDetector()
    both = job_window(
        0,
        {0: {"compute_seconds": 1.0, "forward_seconds": 0.1}, 1: {"compute_seconds": 2.0}},
        {0: {"step_time_seconds/p50": 3.0}, 1: {"step_time_seconds/p50": 3.0}},
    )
    assert detector.section(both) == ("compute_seconds", {0: 1.0, 1: 2.0})
    partial = job_window(
        0,
        {0: {"compute_seconds": 1.0, "forward_seconds": 0.1}, 1: {"forward_seconds": 0.3}},
    )
    found = detector.section(partial)
    assert found is not None and found[0] == "forward_seconds"
    step_only = job_window(0, {0: {}, 1: {}}, {0: {"step_time_seconds/p50": 2.0},
                                               1: {"step_time_seconds/p50": 4.0}})  # fmt: skip
    assert detector.section(step_only) == ("step_time_seconds", {0: 2.0, 1: 4.0})
    scores = detector.scores(step_only)
    assert scores[0] == (1.0, 1.0)
    assert scores[1] == (pytest.approx(0.5, abs=1e-3), 1.0)
    assert detector.section(job_window(0, {0: {"loss": 1.0}})) is None
    assert detector.judge(job_window(0, {0: {"loss": 1.0}})) == []


def test_the_straggler_waits_least_in_backward() -> None:
    """With backward times, the finding has each rank's and says the straggler's is lowest."""
    detector = StragglerDetector(StragglerSettings(consecutive=1))
    [finding] = detector.judge(ddp_window(0, even({6: 1.6}), backward=True))
    assert finding.rank == 6 and finding.waits_least is True
    assert sorted(finding.backward) == list(range(RANKS))
    assert finding.backward[6] == min(finding.backward.values())
    # A slow forward that the all-reduce does not wait for (the rank is not the slowest to
    # finish its step) shows as not waiting least.
    window = ddp_window(1, even({6: 1.6}), backward=True)
    window.ranks[0]["metrics"]["backward_seconds"]["mean"] = 0.01
    [finding] = StragglerDetector(StragglerSettings(consecutive=1)).judge(window)
    assert finding.rank == 6 and finding.waits_least is False
    without = StragglerDetector(StragglerSettings(consecutive=1))
    [finding] = without.judge(ddp_window(0, even({6: 1.6})))
    assert finding.backward == {} and finding.waits_least is None


def test_scores_change_no_state() -> None:
    """scores() any number of times leaves judge() finding the same as without it."""
    plain, probed = StragglerDetector(), StragglerDetector()
    for index in range(6):
        window = ddp_window(index, even({1: 2.0} if index >= 2 else None))
        probed.scores(window)
        probed.scores(window)
        assert [f.index for f in plain.judge(window)] == [f.index for f in probed.judge(window)]
    assert probed.scores(window) == plain.scores(window)


def test_a_restart_starts_a_rank_afresh() -> None:
    """A rank's best time is forgotten at a restart (new hardware may be slower for good)."""
    detector = StragglerDetector(StragglerSettings(consecutive=1, sections=["forward_seconds"]))
    fast = job_window(0, {0: {"forward_seconds": 0.1}})
    assert detector.judge(fast) == []
    slow = job_window(1, {0: {"forward_seconds": 0.2}})
    slow.ranks[0]["restart"] = 1
    assert detector.judge(slow) == []
    assert detector.scores(slow) == {0: (1.0, 1.0)}


def test_disabled_settings_and_their_checks() -> None:
    """enabled: false finds nothing; bad settings are pydantic errors naming the field."""
    detector = StragglerDetector(StragglerSettings(enabled=False, consecutive=1))
    assert detector.judge(ddp_window(0, even({1: 3.0}))) == []
    for bad in ({"threshold": 1.5}, {"consecutive": 0}, {"sections": []}, {"window": 3}):
        with pytest.raises(pydantic.ValidationError):
            StragglerSettings.model_validate(bad)


def test_the_alert_entry_has_the_engines_shape() -> None:
    """A straggler alert has the keys of an alert the engine fires, names rank and host."""
    engine, _ = make({"high": {"type": "threshold", "metric": "x", "above": 1.0}})
    engine.observe("job", 0, 1, 0.0, {"x": 2.0})
    [fired] = engine.take_fired()
    [finding] = StragglerDetector(StragglerSettings(consecutive=1)).judge(
        ddp_window(0, even({6: 1.6}), backward=True)
    )
    alert = straggler_alert(finding)
    assert alert.keys() == fired.keys()
    assert alert["attrs"].keys() >= {"metric", "value", "threshold"}
    assert (alert["kind"], alert["name"], alert["severity"]) == ("alert", "straggler", "warning")
    assert (alert["run"], alert["rank"], alert["step"]) == ("job", 6, 99)
    assert "rank 6 on node1" in alert["message"] and "waits least" in alert["message"]
    assert alert["attrs"]["backward_seconds"] == alert["attrs"]["backward_min_seconds"]


def test_sub_millisecond_sections_flag_nobody() -> None:
    """Forward passes of 0.2-0.6 ms (timer noise as large as the section): the floor keeps
    every relative score above the threshold; without it ranks 1 and 2 would be flagged."""
    noisy = {rank: {"forward_seconds": 0.0002 * (rank + 1)} for rank in range(3)}
    windows = [job_window(i, noisy) for i in range(6)]
    assert [f for w in windows for f in StragglerDetector().judge(w)] == []
    bare = StragglerDetector(StragglerSettings(floor_seconds=0.0))
    assert {f.rank for w in windows for f in bare.judge(w)} == {1, 2}
