"""Convergence figures from a loss curve: reduction, best step, noise and spikes, efficiency
per step and per second, and the state at the end."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from agent.reports import convergence


def decaying(steps: int = 1000, seed: int = 0, sigma: float = 0.05) -> np.ndarray:
    """A language-model-like loss: 1.6 + 3 exp(-step / (steps / 8)), log-normal noise
    clipped at 3 sigma."""
    rng = np.random.default_rng(seed)
    x = np.arange(steps, dtype=float)
    noise = np.exp(sigma * np.clip(rng.normal(size=steps), -3, 3))
    curve: np.ndarray = (1.6 + 3.0 * np.exp(-x / (steps / 8))) * noise
    return curve


def test_linear_curve_gives_exact_reduction_and_efficiency() -> None:
    """A noiseless line: medians of the first and last 5%, loss per 1k steps and per minute."""
    steps = np.arange(1000, dtype=float)
    loss = 10.0 - 0.005 * steps
    result = convergence.analyse(steps, loss, times=1000.0 + steps / 10.0)  # 10 steps/s
    assert result is not None
    initial, final = 10.0 - 0.005 * 24.5, 10.0 - 0.005 * 974.5
    assert result.initial == pytest.approx(initial)
    assert result.final == pytest.approx(final)
    assert result.reduction == pytest.approx((initial - final) / initial)
    assert result.per_1k_steps == pytest.approx((initial - final) / 999 * 1000)
    assert result.per_minute == pytest.approx((initial - final) / (99.9 / 60))
    assert result.steps_per_second == pytest.approx(10.0)
    assert result.spikes == 0
    assert result.state == "improving"
    assert result.best_step == 999


def test_spike_is_counted_once_at_its_step_and_healthy_noise_is_not() -> None:
    """One x20 step stands out of 5% noise; the same curve without it has no spike."""
    loss = decaying()
    healthy = convergence.analyse(np.arange(1000), loss)
    assert healthy is not None and healthy.spikes == 0
    assert healthy.relative_noise == pytest.approx(0.05, rel=0.25)
    loss[500] *= 20
    spiky = convergence.analyse(np.arange(1000), loss)
    assert spiky is not None
    assert (spiky.spikes, spiky.spike_steps) == (1, [500.0])
    assert spiky.best == pytest.approx(healthy.best)  # the trend ignores the spike


def test_ninety_percent_of_the_reduction_comes_early_on_a_fast_decay() -> None:
    """The exponential is near its floor by a third of the run."""
    result = convergence.analyse(np.arange(1000), decaying())
    assert result is not None
    assert result.share_of_run_at_90 is not None and 0.15 < result.share_of_run_at_90 < 0.4
    assert result.reduction == pytest.approx(1 - 1.6 / 4.3, abs=0.05)


@pytest.mark.parametrize(
    ("tail", "state"),
    [(lambda x: 2.0 - x / 1000, "improving"), (lambda x: 0 * x + 1.0, "plateau"),
     (lambda x: 1.0 + (x / 1000) ** 4, "rising")],
)  # fmt: skip
def test_state_at_the_end(tail: Callable[[np.ndarray], np.ndarray], state: str) -> None:
    """Falling, flat and climbing ends are told apart through the noise."""
    x = np.arange(1000, dtype=float)
    rng = np.random.default_rng(1)
    loss = tail(x) * np.exp(0.02 * rng.normal(size=1000))
    result = convergence.analyse(x, loss)
    assert result is not None and result.state == state, result


def test_non_finite_values_are_counted_and_left_out() -> None:
    """NaN from step 700 on: counted with its first step; the figures use the finite points."""
    loss = decaying()
    loss[700:] = math.nan
    result = convergence.analyse(np.arange(1000), loss)
    assert result is not None
    assert (result.nonfinite, result.first_nonfinite_step, result.last_step) == (300, 700.0, 699)


def test_too_few_points_give_none_and_missing_steps_use_the_index() -> None:
    """Under MIN_POINTS finite values there is no curve; NaN steps fall back to the order."""
    assert convergence.analyse(np.arange(5), np.ones(5)) is None
    result = convergence.analyse(np.full(50, math.nan), np.linspace(3, 1, 50))
    assert result is not None and (result.first_step, result.last_step) == (0, 49)


def test_rolling_median_in_chunks_matches_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking (bounded memory) changes nothing."""
    y = np.random.default_rng(2).normal(size=1001)
    whole = convergence.rolling_median(y, 21)
    monkeypatch.setattr(convergence, "CHUNK", 97)
    np.testing.assert_array_equal(convergence.rolling_median(y, 21), whole)
    padded = np.pad(y, 10, mode="edge")
    assert whole[500] == np.median(padded[500:521])


def test_growth_and_validation() -> None:
    """A doubling gradient norm grows x2, a flat one x1; validation's best, and its rise judged
    on rolling medians."""
    assert convergence.growth(np.r_[np.ones(30), np.full(10, 2.0)]) == pytest.approx(2.0)
    assert convergence.growth(np.ones(40)) == pytest.approx(1.0)
    assert convergence.growth(np.ones(4)) is None
    val = convergence.validation(range(50, 401, 50), [3.0, 2.0, 1.5, 1.5, 1.6, 1.8, 1.9, 2.0])
    assert val is not None
    assert (val.best, val.best_step, val.last, val.last_step) == (1.5, 150, 2.0, 400)
    # rolling medians of 3: lowest 1.5 around step 150; the last three's median 1.9
    assert (val.window, val.smoothed_best, val.smoothed_best_step, val.recent) == (3, 1.5, 150, 1.9)
    assert val.above_best == pytest.approx(0.4 / 1.5)
    noisy = convergence.validation(
        range(400), 1.6 * np.exp(0.01 * np.random.default_rng(3).normal(size=400))
    )
    assert noisy is not None and abs(noisy.above_best) < 0.01  # noise around a floor is not a rise
