"""loss_divergence, val_loss_divergence and overfitting on an LR range test left running
(case 1), a shock that recovers (case 2), healthy runs and a genuine overfit."""

from __future__ import annotations

import math
import random

import pytest

from tests.agent.alerts.curves import (
    Run,
    drive,
    healthy,
    lr_range_test,
    overfit,
    warmup_bump,
)
from tests.agent.alerts.helpers import RUN, make

TRAINING = ["loss_divergence", "val_loss_divergence", "overfitting", "loss_spike"]


def fired_steps(run: Run, keep: list[str] = TRAINING, **rules: object) -> list[tuple[str, int]]:
    engine, clock = make(dict(rules), keep=keep)
    return [(alert["name"], alert["step"]) for alert in drive(engine, clock, run)]


@pytest.mark.parametrize("seed", range(5))
def test_lr_range_test_is_divergence_within_50_steps_of_doubling(seed: int) -> None:
    """Case 1: loss_divergence within 50 steps of the smoothed loss doubling; no overfitting."""
    run = lr_range_test(seed)
    doubled = run.doubling_step()
    assert doubled == 303
    fired = fired_steps(run)
    names = [name for name, _ in fired]
    assert "overfitting" not in names
    assert names[0] == "loss_divergence"
    assert doubled - 10 <= fired[0][1] <= doubled + 50
    assert ("val_loss_divergence", 399) in fired  # val/loss every 50 steps: 4 rising evaluations


def test_divergence_alert_says_what_and_what_to_do() -> None:
    """The message gives the ratio, the best, that it rises and how the lr moves; advice too."""
    engine, clock = make(keep=["loss_divergence"])
    (alert,) = drive(engine, clock, lr_range_test(0))
    assert alert["severity"] == "error" and alert["step"] == 308
    attrs = alert["attrs"]
    assert attrs["ratio"] >= 2.0 and attrs["rising_fraction"] >= 0.8
    assert attrs["lr_trend"] == "rising" and attrs["lr"] == pytest.approx(0.01 * 1.015**307)
    assert alert["message"] == (
        f"loss divergence: smoothed loss is {attrs['ratio']:.1f} times its best "
        f"{attrs['best']:.4g} and rising (now {attrs['smoothed']:.4g}); the learning rate is "
        f"not being cut (lr rising) (run {RUN}, rank 0, step 308)"
    )
    assert "lower learning rate" in alert["advice"]


@pytest.mark.parametrize("seed", range(5))
def test_shock_that_recovers_is_a_spike_not_divergence_or_overfitting(seed: int) -> None:
    """Case 2: one corrupt batch at step 700: loss_spike there, and nothing else after it."""
    assert fired_steps(healthy(seed, shock_at=700)) == [("loss_spike", 700)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sigma", [0.15, 0.3])
def test_healthy_noisy_runs_raise_nothing(seed: int, sigma: float) -> None:
    """Noisy loss and val/loss, cosine lr, with and without warm-up: no divergence, no overfit."""
    keep = ["loss_divergence", "val_loss_divergence", "overfitting"]
    assert fired_steps(healthy(seed, sigma=sigma), keep) == []
    assert fired_steps(healthy(seed, sigma=sigma, warmup=100), keep) == []


@pytest.mark.parametrize("seed", range(5))
def test_warmup_bump_below_the_factor_is_quiet(seed: int) -> None:
    """A loss bump to 1.8x its best while lr warms up does not fire; 2.6x does, on the climb."""
    assert fired_steps(warmup_bump(1.8, seed)) == []
    run = warmup_bump(2.6, seed)
    fired = fired_steps(run)
    assert [name for name, _ in fired] == ["loss_divergence"]
    low = min(run.shape[:150])  # the best before the bump
    doubled = next(s for s in range(150, 180) if run.shape[s] >= 2 * low)
    assert doubled - 10 <= fired[0][1] <= 180  # on the climb, before the bump's top at 180


def test_lr_being_cut_holds_the_alert_back() -> None:
    """The lr cut to a third at step 280: nothing while the cut is in the window, then it fires."""
    run = lr_range_test(0)
    assert run.lr is not None
    run.lr = [lr if step < 280 else run.lr[279] / 3 for step, lr in enumerate(run.lr)]
    engine, clock = make(keep=["loss_divergence"])
    (alert,) = drive(engine, clock, run)
    # the window is the last 50 medians: the lr at its start is the pre-cut one until 280 + 50
    assert alert["step"] == 280 + 50 - 1 + 1
    assert alert["attrs"]["lr_trend"] == "steady"


def test_divergence_without_lr_and_with_lr_metric_off() -> None:
    """Without lr samples, or with lr_metric null, the loss alone decides: same step."""
    run = lr_range_test(0)
    run.lr = None
    engine, clock = make(keep=["loss_divergence"])
    (alert,) = drive(engine, clock, run)
    assert alert["step"] == 308 and alert["attrs"]["lr_trend"] == "not logged"
    engine, clock = make({"loss_divergence": {"lr_metric": None}}, keep=["loss_divergence"])
    assert [a["step"] for a in drive(engine, clock, lr_range_test(0))] == [308]


def test_divergence_restarts_when_steps_go_back() -> None:
    """A restart from a checkpoint (steps go back) starts a new curve: a fresh best and window."""
    engine, clock = make({"loss_divergence": {"cooldown": 0.0}}, keep=["loss_divergence"])
    first = drive(engine, clock, lr_range_test(0, steps=330))
    assert [a["step"] for a in first] == [308]
    again = drive(engine, clock, lr_range_test(1))
    assert again[0]["step"] == 305  # as on a fresh engine: nothing of the first curve is kept


def test_divergence_factor_is_configurable() -> None:
    """factor 4: the median must reach 4x its best; later on the same run."""
    engine, clock = make({"loss_divergence": {"factor": 4.0}}, keep=["loss_divergence"])
    (alert,) = drive(engine, clock, lr_range_test(0))
    run = lr_range_test(0)
    low = min(run.shape)
    quadrupled = next(s for s in range(len(run.shape)) if s > 100 and run.shape[s] >= 4 * low)
    assert quadrupled - 10 <= alert["step"] <= quadrupled + 50
    assert alert["attrs"]["ratio"] >= 4.0


@pytest.mark.parametrize("seed", range(5))
def test_genuine_overfit_fires_overfitting_only(seed: int) -> None:
    """Train falling, val rising ~1% per evaluation after step 600: overfitting, no divergence."""
    fired = fired_steps(overfit(seed))
    assert [name for name, _ in fired] == ["overfitting"]
    assert 749 <= fired[0][1] <= 999


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("factor", 1.0, "greater than 1"),
        ("window", 2, "greater than or equal to 3"),
        ("rising_fraction", 0.5, "greater than 0.5"),
        ("lr_cut", 1.0, "less than 1"),
        ("lr_metric", "lr/*", "not a glob"),
    ],
)
def test_divergence_spec_errors(field: str, value: object, needle: str) -> None:
    """Out-of-range settings are config errors that name the field."""
    with pytest.raises(ValueError, match=needle):
        make({"loss_divergence": {field: value}}, keep=["loss_divergence"])


def near_zero_bump(seed: int = 0) -> Run:
    """A loss that falls from 2.3 to 0.02 by step 150, climbs steadily to 0.06 by step 250
    (three times its best, every third of the climb rising) and settles: the healthy CNN with
    SGD at a constant lr of the failure suite."""
    rng = random.Random(seed)
    shape = []
    for step in range(400):
        if step < 150:
            value = 0.02 + 2.28 * math.exp(-step / 25)
        elif step < 250:
            value = 0.02 + 0.04 * (step - 150) / 100
        else:
            value = 0.06
        shape.append(value)
    loss = [v * math.exp(rng.gauss(0, 0.05)) for v in shape]
    return Run(shape, loss, [0.1] * len(shape))


def test_a_bump_near_zero_is_not_divergence() -> None:
    """Three times its best, climbing, lr steady, but a rise of 2% of the ground covered:
    quiet with the built-in min_rise (10%); min_rise 0 shows the rest of the test holds."""
    assert fired_steps(near_zero_bump(), keep=["loss_divergence"]) == []
    loose = fired_steps(
        near_zero_bump(), keep=["loss_divergence"], loss_divergence={"min_rise": 0.0}
    )
    assert [name for name, _ in loose] == ["loss_divergence"]
