"""Rank divergence on synthetic job windows: robust scores, streaks, non-finite ranks."""

from __future__ import annotations

import random
import statistics

import numpy as np
import pydantic
import pytest

from agent.aggregation.config import DivergenceSettings
from agent.aggregation.divergence import DivergenceDetector, DivergenceFinding, loo_medians
from agent.aggregation.findings import divergence_alert
from agent.aggregation.windows import JobWindow
from tests.agent.aggregation.factory import job_window, stats
from tests.agent.alerts.helpers import make

RANKS = 8


def losses(
    index: int, rng: random.Random, departed: dict[int, float] | None = None, level: float = 2.0
) -> JobWindow:
    """8 ranks' window mean loss around ``level`` (0.5% noise); ``departed`` ranks' given."""
    per_rank = {}
    for rank in range(RANKS):
        loss = (departed or {}).get(rank, level * (1 + rng.gauss(0, 0.005)))
        per_rank[rank] = {"loss": loss, "grad_norm": 1.25}  # grad_norm: all-reduced, equal
    return job_window(index, per_rank)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 9])
def test_leave_one_out_medians_match_the_plain_definition(n: int) -> None:
    """loo_medians[i] is the median of every value but the i-th, ties included."""
    rng = np.random.default_rng(n)
    values = np.round(rng.normal(size=n), 1)  # rounding makes ties
    expected = [statistics.median(np.delete(values, i)) for i in range(n)]
    assert loo_medians(values) == pytest.approx(expected)


def test_a_rank_whose_loss_departs_is_flagged_after_consecutive_windows() -> None:
    """Rank 3's loss at 2.6 while the others sit at 2.0: flagged in its 2nd window, once."""
    detector = DivergenceDetector()
    rng = random.Random(0)
    for index in range(10):
        assert detector.judge(losses(index, rng)) == []
    got = [detector.judge(losses(index, rng, {3: 2.6})) for index in range(10, 16)]
    assert [len(findings) for findings in got] == [0, 1, 0, 0, 0, 0]
    finding = got[1][0]
    assert (finding.rank, finding.host, finding.metric, finding.index) == (3, "node0", "loss", 11)
    assert finding.value == 2.6 and finding.median == pytest.approx(2.0, rel=0.01)
    assert finding.score > 6 and not finding.nonfinite


def test_ranks_that_move_together_are_not_flagged() -> None:
    """The loss falling from 5 to 1 on every rank at once is training, not divergence."""
    detector = DivergenceDetector()
    rng = random.Random(1)
    found = []
    for index in range(60):
        found += detector.judge(losses(index, rng, level=5.0 * 0.97**index))
    assert found == []


def test_a_departure_that_comes_back_and_departs_again_flags_twice() -> None:
    """One finding per episode of departure."""
    detector = DivergenceDetector()
    rng = random.Random(2)
    plan = [None, {1: 3.0}, {1: 3.0}, {1: 3.0}, None, {1: 0.5}, {1: 0.5}]
    flagged = []
    for index, departed in enumerate(plan):
        flagged += [(f.index, f.rank) for f in detector.judge(losses(index, rng, departed))]
    assert flagged == [(2, 1), (6, 1)]


def test_equal_grad_norms_with_one_desynchronised_rank() -> None:
    """All-reduced grad_norm is equal on every rank: one rank 10% off is flagged."""
    detector = DivergenceDetector(DivergenceSettings(metrics=["grad_norm"], consecutive=1))
    per_rank = {rank: {"grad_norm": 1.25} for rank in range(RANKS)}
    assert detector.judge(job_window(0, per_rank)) == []
    per_rank[4] = {"grad_norm": 1.375}
    [finding] = detector.judge(job_window(1, per_rank))
    assert (finding.rank, finding.metric, finding.median) == (4, "grad_norm", 1.25)
    # 0.125 off over a floor of 1% of 1.25: a score of 10.
    assert finding.score == pytest.approx(10.0)


def test_a_nan_rank_is_flagged_at_once_while_the_others_are_finite() -> None:
    """A rank with non-finite losses in its window, the others without: flagged in that window."""
    detector = DivergenceDetector()
    per_rank: dict[int, dict] = {rank: {"loss": 2.0 + rank / 1000} for rank in range(RANKS)}
    per_rank[2] = {"loss": stats(None, nonfinite=100)}
    [finding] = detector.judge(job_window(0, per_rank))
    assert (finding.rank, finding.metric, finding.nonfinite) == (2, "loss", True)
    assert np.isnan(finding.value) and finding.median == pytest.approx(2.004)
    assert detector.judge(job_window(1, per_rank)) == []  # the same episode
    alert = divergence_alert(finding)
    assert "non-finite loss" in alert["message"] and "rank 2 on node0" in alert["message"]
    assert alert["attrs"]["value"] is None and alert["attrs"]["nonfinite"] is True


def test_two_ranks_get_the_nonfinite_check_only() -> None:
    """Two ranks that differ say nothing about which departed; a lone NaN still does."""
    detector = DivergenceDetector(DivergenceSettings(consecutive=1))
    assert detector.judge(job_window(0, {0: {"loss": 2.0}, 1: {"loss": 9.0}})) == []
    half = {0: {"loss": 2.0}, 1: {"loss": stats(3.0, nonfinite=1)}}
    assert [(f.rank, f.nonfinite) for f in detector.judge(job_window(1, half))] == [(1, True)]
    every = {0: {"loss": stats(None, nonfinite=5)}, 1: {"loss": stats(None, nonfinite=5)}}
    assert detector.judge(job_window(2, every)) == []  # all ranks NaN: the nonfinite rule's job


def test_ranks_without_the_metric_are_left_out() -> None:
    """Only ranks that logged the metric are compared; fewer than 3 give no score."""
    detector = DivergenceDetector(DivergenceSettings(consecutive=1))
    per_rank = {0: {"loss": 2.0}, 1: {"loss": 2.0}, 2: {"acc": 1.0}, 3: {"loss": 20.0}}
    [finding] = detector.judge(job_window(0, per_rank))
    assert finding.rank == 3
    assert detector.judge(job_window(1, {0: {"loss": 2.0}, 1: {"acc": 20.0}})) == []


def test_disabled_and_settings_checks() -> None:
    """enabled: false finds nothing; min_ranks below 3 and unknown keys are refused."""
    detector = DivergenceDetector(DivergenceSettings(enabled=False, consecutive=1))
    rng = random.Random(3)
    assert detector.judge(losses(0, rng, {0: 50.0})) == []
    for bad in ({"min_ranks": 2}, {"threshold": 0}, {"consecutive": 0}, {"metric": "loss"}):
        with pytest.raises(pydantic.ValidationError):
            DivergenceSettings.model_validate(bad)


def test_the_alert_entry_has_the_engines_shape() -> None:
    """A rank_divergence alert has the keys of an alert the engine fires, names rank and host."""
    engine, _ = make({"high": {"type": "threshold", "metric": "x", "above": 1.0}})
    engine.observe("job", 0, 1, 0.0, {"x": 2.0})
    [fired] = engine.take_fired()
    finding: DivergenceFinding = DivergenceDetector(DivergenceSettings(consecutive=1)).judge(
        losses(4, random.Random(4), {7: 4.0})
    )[0]
    alert = divergence_alert(finding)
    assert alert.keys() == fired.keys()
    assert alert["attrs"].keys() >= {"metric", "value", "threshold"}
    assert (alert["kind"], alert["name"], alert["severity"]) == (
        "alert",
        "rank_divergence",
        "warning",
    )
    assert (alert["rank"], alert["step"], alert["attrs"]["value"]) == (7, 499, 4.0)
    assert "rank 7 on node1" in alert["message"] and "loss=4" in alert["message"]
