"""Training rules: loss_plateau, overfitting, memory_leak, input_bound (collapse: its own file)."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from agent.alerts.engine import AlertEngine
from agent.alerts.rules import least_squares_slope
from tests.agent.alerts.helpers import RSS, RUN, Clock, feed, make, noisy


# -- loss_plateau ----------------------------------------------------------------------------------
def test_plateau_fires_after_patience_on_val_loss() -> None:
    """Improving then flat val/loss: fires on the 11th evaluation without improvement."""
    engine, clock = make(keep=["loss_plateau"])
    values = [2.0 - 0.1 * i for i in range(5)] + [1.6] * 30
    fired = feed(engine, clock, "val/loss", values)
    # best 1.6 at index 4; indices 5..15 are 11 bad evaluations > patience 10
    assert [a["step"] for a in fired] == [15]
    assert fired[0]["attrs"]["best"] == pytest.approx(1.6)
    assert fired[0]["attrs"]["bad_evaluations"] == 11
    assert "ReduceLROnPlateau" in fired[0]["message"]


def test_plateau_matches_torch_reduce_lr_on_plateau() -> None:
    """The evaluations where it fires are exactly those where ReduceLROnPlateau cuts the LR."""
    torch = pytest.importorskip("torch")
    settings = {"patience": 3, "threshold": 0.01, "cooldown_evaluations": 2}
    rng = random.Random(5)
    values = [1.0 / (1 + 0.05 * i) + rng.uniform(0, 0.05) for i in range(300)]
    for mode in ("rel", "abs"):
        rule = {**settings, "threshold_mode": mode, "cooldown": 0.0}
        engine, clock = make({"loss_plateau": rule}, keep=["loss_plateau"])
        fired = [a["step"] for a in feed(engine, clock, "val/loss", values)]
        param = torch.nn.Parameter(torch.zeros(1))
        optimizer = torch.optim.SGD([param], lr=1.0)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.9, patience=3, threshold=0.01, threshold_mode=mode, cooldown=2
        )
        cuts = []
        for step, value in enumerate(values):
            before = optimizer.param_groups[0]["lr"]
            scheduler.step(value)
            if optimizer.param_groups[0]["lr"] < before:
                cuts.append(step)
        assert cuts and fired == cuts, mode


def test_plateau_quiet_on_slowly_decreasing_loss() -> None:
    """A noisy train loss falling 0.05% a step never plateaus (fallback: 100-sample means)."""
    engine, clock = make(keep=["loss_plateau"])
    assert feed(engine, clock, "loss", noisy(3.0, 0.05, 6000, seed=6, trend=-5e-4)) == []


def test_plateau_fallback_on_train_loss_until_val_loss_appears() -> None:
    """Flat train loss plateaus in 100-step means; once val/loss arrives, train loss is ignored."""
    engine, clock = make(keep=["loss_plateau"])
    fired = feed(engine, clock, "loss", [1.0] * 1200)
    # evaluation 1 sets best; evaluations 2..12 are 11 bad ones: the 12th mean ends at step 1199
    assert [(a["step"], a["attrs"]["metric"]) for a in fired] == [(1199, "loss")]
    engine, clock = make({"loss_plateau": {"cooldown": 0.0}}, keep=["loss_plateau"])
    engine.observe(RUN, 0, 0, clock.now, {"val/loss": 1.0})
    assert feed(engine, clock, "loss", [1.0] * 3000) == []


# -- overfitting -----------------------------------------------------------------------------------
def _train_and_val(
    engine: AlertEngine, clock: Clock, train: list[float], val: list[float], every: int = 100
) -> list[dict[str, Any]]:
    """Train loss each step; val/loss after each block of ``every`` steps."""
    fired: list[dict[str, Any]] = []
    for index, val_value in enumerate(val):
        for offset, loss in enumerate(train[index * every : (index + 1) * every]):
            clock.advance(1)
            engine.observe(RUN, 0, index * every + offset, clock.now, {"loss": loss})
        engine.observe(RUN, 0, (index + 1) * every - 1, clock.now, {"val/loss": val_value})
        fired.extend(engine.take_fired())
    return fired


def test_overfitting_val_rising_while_train_falls() -> None:
    """Val above its best x 1.03 for 4 evaluations while train falls: fires at the 4th."""
    engine, clock = make(keep=["overfitting"])
    train = [2.0 * math.exp(-i / 500) for i in range(1200)]
    val = [2.0, 1.8, 1.7, 1.65, 1.66, 1.69, 1.75, 1.8, 1.86, 1.9, 1.95, 2.0]
    fired = _train_and_val(engine, clock, train, val)
    # best 1.65 (index 3); 1.66, 1.69 are within 3% of it; 1.75 .. 1.9 are the 4 above it
    assert [(a["name"], a["step"]) for a in fired] == [("overfitting", 999)]
    attrs = fired[0]["attrs"]
    assert attrs["best"] == pytest.approx(1.65) and attrs["streak"] == 4
    assert attrs["rise"] == pytest.approx(1.9 / 1.65 - 1)
    assert attrs["train_fall"] == pytest.approx(1 - math.exp(-400 / 500), rel=0.01)
    assert "above its best 1.65 for 4 evaluations" in fired[0]["message"]


def test_overfitting_quiet_when_both_fall_or_both_rise() -> None:
    """Val falling with train, or val rising with train (divergence), is not overfitting."""
    engine, clock = make(keep=["overfitting"])
    train = [2.0 * math.exp(-i / 500) for i in range(1000)]
    val = [2.0 - 0.05 * i for i in range(10)]
    assert _train_and_val(engine, clock, train, val) == []
    engine, clock = make(keep=["overfitting"])
    rising = [1.0 + i / 500 for i in range(1000)]
    assert _train_and_val(engine, clock, rising, [1.0 + 0.1 * i for i in range(10)]) == []


def test_overfitting_quiet_when_val_comes_back_down() -> None:
    """Val above its best but falling back (a recovery), train falling: not overfitting."""
    engine, clock = make(keep=["overfitting"])
    train = [2.0 * math.exp(-i / 500) for i in range(1000)]
    val = [2.0, 1.8, 1.6, 2.4, 2.2, 2.0, 1.9, 1.8, 1.7, 1.66]
    assert _train_and_val(engine, clock, train, val) == []
    # the same values in rising order do fire: the order is what tells them apart
    engine, clock = make(keep=["overfitting"])
    val = [2.0, 1.8, 1.6, 1.7, 1.8, 1.9, 2.0, 2.2, 2.4, 2.5]
    assert [a["step"] for a in _train_and_val(engine, clock, train, val)] == [699]


def test_overfitting_quiet_after_a_shock_in_the_span() -> None:
    """A train sample above 3x the previous interval's median voids the evaluations around it."""
    train = [2.0 * math.exp(-i / 500) for i in range(1200)]
    val = [2.0, 1.8, 1.6, 1.7, 1.8, 1.9, 2.0, 2.2, 2.4, 2.5, 2.6, 2.7]
    shocked = list(train)
    shocked[450] *= 10  # in the interval of the 5th evaluation
    engine, clock = make(keep=["overfitting"])
    fired = _train_and_val(engine, clock, shocked, val)
    # evaluations 4..7 hold the shock; the first span of 4 + 1 without it ends at index 9
    assert [a["step"] for a in fired] == [999]


def test_least_squares_slope() -> None:
    """The slope helper the trend rules share is an ordinary least-squares fit."""
    assert least_squares_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert least_squares_slope([1, 1], [0, 5]) is None
    assert least_squares_slope([1], [2]) is None


# -- memory_leak -----------------------------------------------------------------------------------


def test_memory_leak_fires_on_steady_growth() -> None:
    """RSS growing 1 MB/s from 2 GB fires once the 15-minute window is full (after warm-up)."""
    engine, clock = make(keep=["memory_leak"])
    rng = random.Random(7)
    values = [2e9 + 1e6 * i + rng.gauss(0, 5e6) for i in range(1800)]
    fired = feed(engine, clock, RSS, values, rank=-1)
    assert len(fired) == 1
    alert = fired[0]
    assert alert["rank"] == -1 and alert["attrs"]["metric"] == RSS
    assert alert["attrs"]["slope"] == pytest.approx(1e6, rel=0.05)
    assert alert["attrs"]["growth"] >= 0.05
    assert 300 + 900 * 0.8 <= alert["attrs"]["value"] / 1e6 - 2000 <= 1800


def test_memory_leak_quiet_on_steady_or_stepped_rss() -> None:
    """A steady RSS with noise, or one jump (a cache filling) then flat, is not a leak."""
    engine, clock = make(keep=["memory_leak"])
    rng = random.Random(8)
    assert feed(engine, clock, RSS, [3e9 + rng.gauss(0, 2e7) for _ in range(3600)], rank=-1) == []
    engine, clock = make(keep=["memory_leak"])
    stepped = [2e9 if i < 1000 else 2.6e9 for i in range(3600)]
    assert feed(engine, clock, RSS, stepped, rank=-1) == []


def test_memory_leak_cooldown() -> None:
    """A leak that stops and starts again within an hour is suppressed, after an hour fires."""
    engine, clock = make({"memory_leak": {"cooldown": 3600.0}}, keep=["memory_leak"])
    values = [1e9 + 2e6 * i for i in range(1500)] + [4e9] * 1200
    values += [4e9 + 2e6 * i for i in range(1200)]
    fired = feed(engine, clock, "cuda_memory_allocated_bytes", values)
    assert len(fired) == 1 and engine.suppressed() == {"memory_leak": 1}
    more = [values[-1] + 2e6 * i for i in range(1, 1500)]
    fired = feed(engine, clock, "cuda_memory_allocated_bytes", more, start=len(values))
    assert len(fired) == 1


# -- input_bound -----------------------------------------------------------------------------------
def _input_stream(
    engine: AlertEngine, clock: Clock, seconds: int, util: float, wait: float
) -> list[dict[str, Any]]:
    fired: list[dict[str, Any]] = []
    for step in range(seconds):
        clock.advance(1)
        engine.observe(RUN, -1, None, clock.now, {"system/gpu0/util_percent": util})
        engine.observe(
            RUN, 0, step, clock.now, {"step_time_seconds": 0.2, "data_wait_seconds": wait * 0.2}
        )
        engine.observe(RUN, 1, step, clock.now, {"step_time_seconds": 0.2})  # rank 1 never waits
        fired.extend(engine.take_fired())
    return fired


def test_input_bound_fires_when_gpu_idle_and_data_slow() -> None:
    """GPU at 20% while rank 0 waits half of each step, for 120 s: fires naming rank 0."""
    engine, clock = make(keep=["input_bound"])
    fired = _input_stream(engine, clock, 200, util=20.0, wait=0.5)
    assert len(fired) == 1
    alert = fired[0]
    assert alert["attrs"]["worst_rank"] == 0 and alert["attrs"]["wait_fraction"] > 0.3
    assert 119 <= alert["step"] <= 122  # one sample a second: sustained for 120 s
    assert "rank 0 waits for data" in alert["message"]


def test_input_bound_quiet_when_gpu_busy_or_data_fast() -> None:
    """A busy GPU with slow data, or an idle GPU with fast data, is not input bound."""
    engine, clock = make(keep=["input_bound"])
    assert _input_stream(engine, clock, 400, util=95.0, wait=0.6) == []
    engine, clock = make(keep=["input_bound"])
    assert _input_stream(engine, clock, 400, util=20.0, wait=0.05) == []


def test_input_bound_cooldown() -> None:
    """Input bound again within 1800 s is suppressed; after that it fires again."""
    engine, clock = make({"input_bound": {"for_seconds": 0.0}}, keep=["input_bound"])
    assert len(_input_stream(engine, clock, 30, util=20.0, wait=0.9)) == 1
    _input_stream(engine, clock, 60, util=95.0, wait=0.9)
    assert _input_stream(engine, clock, 30, util=20.0, wait=0.9) == []
    assert engine.suppressed() == {"input_bound": 1}
    _input_stream(engine, clock, 10, util=95.0, wait=0.9)
    clock.advance(1800)
    assert len(_input_stream(engine, clock, 30, util=20.0, wait=0.9)) == 1
