"""Rules on any metric: nonfinite, zscore (loss_spike, grad_explosion), threshold, rate."""

from __future__ import annotations

import math
import random

import pytest

from tests.agent.alerts.helpers import RUN, feed, make, names, noisy


# -- nonfinite -------------------------------------------------------------------------------------
def test_nonfinite_fires_on_nan_loss_and_flags() -> None:
    """NaN/inf loss or grad_norm, or a set *_nonfinite flag, is critical; finite is quiet."""
    engine, clock = make(keep=["nonfinite"])
    engine.observe(RUN, 0, 1, clock.now, {"loss": 2.0, "grad_norm": 1.0, "grad_nonfinite": 0})
    assert engine.take_fired() == []
    engine.observe(RUN, 0, 2, clock.now, {"loss": math.nan, "loss_nonfinite": 1})
    (alert,) = engine.take_fired()
    assert alert["name"] == "nonfinite" and alert["severity"] == "critical"
    assert alert["run"] == RUN and alert["rank"] == 0 and alert["step"] == 2
    assert "non-finite" in alert["message"] and "step 2" in alert["message"]
    engine2, clock2 = make(keep=["nonfinite"])
    engine2.observe(RUN, 3, 7, clock2.now, {"grad_nonfinite": 1.0})
    engine2.observe(RUN, 4, 7, clock2.now, {"grad_norm": math.inf})
    assert [(a["rank"], a["attrs"]["metric"]) for a in engine2.take_fired()] == [
        (3, "grad_nonfinite"),
        (4, "grad_norm"),
    ]


def test_nonfinite_cooldown() -> None:
    """One alert per episode; a new episode within the cooldown is suppressed, later it fires."""
    engine, clock = make(keep=["nonfinite"])  # cooldown 300 s
    engine.observe(RUN, 0, 1, clock.now, {"loss": math.nan})
    engine.observe(RUN, 0, 2, clock.now, {"loss": math.nan})  # same episode: nothing new
    assert names(engine) == ["nonfinite"]
    assert engine.active() == [{"name": "nonfinite", "severity": "critical", "run": RUN}]
    clock.advance(10)
    engine.observe(RUN, 0, 3, clock.now, {"loss": 1.0})
    assert engine.active() == []
    engine.observe(RUN, 0, 4, clock.now, {"loss": math.inf})
    assert names(engine) == [] and engine.suppressed() == {"nonfinite": 1}
    clock.advance(300)
    engine.observe(RUN, 0, 5, clock.now, {"loss": 1.0})
    engine.observe(RUN, 0, 6, clock.now, {"loss": math.nan})
    assert names(engine) == ["nonfinite"]
    assert engine.counts() == {("nonfinite", "critical"): 2}


# -- loss_spike ------------------------------------------------------------------------------------
def test_loss_spike_quiet_on_noisy_stable_loss() -> None:
    """A decreasing loss with 10% log-normal noise for 3000 steps does not trip loss_spike."""
    engine, clock = make(keep=["loss_spike"])
    assert feed(engine, clock, "loss", noisy(2.0, 0.1, 3000, seed=1, trend=-2e-4)) == []


def test_loss_spike_fires_respects_warmup_and_cooldown() -> None:
    """A 3x jump fires after warmup (not before); a second within 300 s is suppressed."""
    engine, clock = make(keep=["loss_spike"])
    values = noisy(2.0, 0.05, 800, seed=2)
    values[10] *= 3  # inside the 50-sample warmup
    for step in (200, 300, 600):
        values[step] *= 3
    fired = feed(engine, clock, "loss", values)
    assert [a["step"] for a in fired] == [200, 600]
    assert engine.suppressed() == {"loss_spike": 1}
    alert = fired[0]
    assert alert["attrs"]["zscore"] > 4 and alert["attrs"]["threshold"] == 4.0
    assert alert["attrs"]["mean"] == pytest.approx(2.0, rel=0.1)
    assert "standard deviations above" in alert["message"]


def test_loss_spike_is_per_run_and_rank() -> None:
    """Each (run, rank) has its own moving average; a spike on rank 1 names rank 1."""
    engine, clock = make(keep=["loss_spike"])
    for step in range(100):
        clock.advance(1)
        for rank in (0, 1):
            loss = 1.0 + 0.01 * ((step * (rank + 1)) % 3)
            if rank == 1 and step == 80:
                loss = 5.0
            engine.observe(RUN, rank, step, clock.now, {"loss": loss})
    fired = engine.take_fired()
    assert [(a["rank"], a["step"]) for a in fired] == [(1, 80)]


# -- grad_explosion / grad_vanishing ---------------------------------------------------------------
def test_grad_explosion_absolute_bound_and_zscore() -> None:
    """Above 1e4 fires at once (even in warmup); a 20x jump of a stable norm fires by z-score."""
    engine, clock = make(keep=["grad_explosion"])
    fired = feed(engine, clock, "grad_norm", [1.0, 2.0, 5e4])
    assert [(a["step"], a["attrs"]["threshold"]) for a in fired] == [(2, 10000.0)]
    engine, clock = make(keep=["grad_explosion"])
    values = noisy(0.5, 0.2, 400, seed=3)
    values[300] *= 20
    fired = feed(engine, clock, "grad_norm", values)
    assert [a["step"] for a in fired] == [300]
    assert fired[0]["severity"] == "error"


def test_grad_explosion_quiet_on_stable_norm() -> None:
    """A noisy but stable gradient norm does not trip grad_explosion."""
    engine, clock = make(keep=["grad_explosion"])
    assert feed(engine, clock, "grad_norm", noisy(0.5, 0.3, 3000, seed=4)) == []


def test_grad_explosion_needs_a_tenfold_jump() -> None:
    """A one-step 3.3x spike of a steady pre-clipping norm (nanoGPT's CPU config at step 283:
    1.1 -> 3.6, clipped to 1.0, the loss unmoved) is quiet; 9x is quiet, 11x fires."""
    values = noisy(1.1, 0.1, 400, seed=5)
    values[283] = 3.6
    engine, clock = make(keep=["grad_explosion"])
    assert feed(engine, clock, "grad_norm", values) == []
    for factor, fires in ((9.0, False), (11.0, True)):
        values = [1.1] * 300
        values[200] *= factor
        engine, clock = make(keep=["grad_explosion"])
        assert [a["step"] for a in feed(engine, clock, "grad_norm", values)] == (
            [200] if fires else []
        ), factor


def test_grad_vanishing_needs_a_sustained_span() -> None:
    """grad_norm under 1e-7 fires after a span of 100 steps, not 99; a brief dip is quiet."""
    engine, clock = make(keep=["grad_vanishing"])
    assert feed(engine, clock, "grad_norm", [1e-9] * 50 + [0.1] * 10) == []
    fired = feed(engine, clock, "grad_norm", [1e-9] * 100, start=1000)
    assert [a["step"] for a in fired] == [1099]
    assert fired[0]["attrs"]["threshold"] == 1e-7


def test_grad_vanishing_cooldown() -> None:
    """Fires once, a new episode within 1800 s is suppressed, one after that fires."""
    engine, clock = make(keep=["grad_vanishing"])
    assert len(feed(engine, clock, "grad_norm", [1e-9] * 100)) == 1
    feed(engine, clock, "grad_norm", [1.0])
    assert feed(engine, clock, "grad_norm", [1e-9] * 100, start=200) == []
    assert engine.suppressed() == {"grad_vanishing": 1}
    feed(engine, clock, "grad_norm", [1.0], start=300)
    clock.advance(1800)
    assert len(feed(engine, clock, "grad_norm", [1e-9] * 100, start=400)) == 1


# -- GPU rules -------------------------------------------------------------------------------------
def test_gpu_temperature_sustained_per_gpu() -> None:
    """Above 85 C for 60 s fires per GPU (not at 59 s); cooling down clears the active alert."""
    engine, clock = make(keep=["gpu_temperature"])
    hot = "system/gpu1/temperature_c"
    engine.observe(RUN, -1, None, clock.now, {"system/gpu0/temperature_c": 70.0, hot: 90.0})
    for _ in range(59):
        clock.advance(1)
        engine.observe(RUN, -1, None, clock.now, {"system/gpu0/temperature_c": 70.0, hot: 90.0})
    assert engine.take_fired() == []
    clock.advance(1)
    engine.observe(RUN, -1, None, clock.now, {hot: 91.0})
    (alert,) = engine.take_fired()
    assert alert["attrs"]["metric"] == hot and alert["attrs"]["threshold"] == 85.0
    assert engine.active() == [{"name": "gpu_temperature", "severity": "warning", "run": RUN}]
    engine.observe(RUN, -1, None, clock.now, {hot: 80.0})
    assert engine.active() == []


def test_gpu_temperature_cooldown() -> None:
    """A second hot spell within 900 s is suppressed; one after 900 s fires."""
    engine, clock = make({"gpu_temperature": {"for_seconds": 0.0}}, keep=["gpu_temperature"])
    metric = "system/gpu0/temperature_c"
    for value, seconds in ((90, 0), (80, 10), (90, 10), (80, 10), (90, 900)):
        clock.advance(seconds)
        engine.observe(RUN, -1, None, clock.now, {metric: value})
    assert names(engine) == ["gpu_temperature", "gpu_temperature"]
    assert engine.suppressed() == {"gpu_temperature": 1}


def test_gpu_power_near_its_limit() -> None:
    """Power above 98% of power_limit_watts for 300 s fires; without a limit it is quiet."""
    engine, clock = make(keep=["gpu_power"])
    for _ in range(302):  # the limit arrives after the first power sample
        clock.advance(1)
        engine.observe(
            RUN,
            -1,
            None,
            clock.now,
            {
                "system/gpu0/power_watts": 398.0,
                "system/gpu0/power_limit_watts": 400.0,
                "system/gpu1/power_watts": 300.0,
                "system/gpu1/power_limit_watts": 400.0,
                "system/gpu2/power_watts": 700.0,  # no limit known for gpu2
            },
        )
    fired = engine.take_fired()
    assert [(a["attrs"]["metric"], a["attrs"]["threshold"]) for a in fired] == [
        ("system/gpu0/power_watts", pytest.approx(392.0))
    ]


def test_gpu_power_absolute_threshold() -> None:
    """With `above` set, GPUs that report no power limit are held to it."""
    engine, clock = make({"gpu_power": {"above": 650.0, "for_seconds": 10.0}}, keep=["gpu_power"])
    fired = feed(engine, clock, "system/gpu2/power_watts", [700.0] * 12, rank=-1)
    assert len(fired) == 1 and fired[0]["attrs"]["threshold"] == 650.0


# -- user rules ------------------------------------------------------------------------------------
def test_threshold_rule_with_glob_and_for_steps() -> None:
    """A glob threshold rule keys its state and cooldown by the matching metric."""
    rule = {
        "type": "threshold",
        "metric": "system/gpu*/memory_used_bytes",
        "above": 70e9,
        "for_steps": 3,
        "severity": "error",
    }
    engine, clock = make({"gpu_memory_full": rule})
    for _ in range(3):
        clock.advance(1)
        engine.observe(
            RUN,
            -1,
            None,
            clock.now,
            {"system/gpu0/memory_used_bytes": 75e9, "system/gpu1/memory_used_bytes": 79e9},
        )
    fired = engine.take_fired()
    assert sorted(a["attrs"]["metric"] for a in fired) == [
        "system/gpu0/memory_used_bytes",
        "system/gpu1/memory_used_bytes",
    ]
    assert all(a["severity"] == "error" and "is above" in a["message"] for a in fired)


def test_threshold_below_and_for_seconds() -> None:
    """`below` with `for_seconds` holds on sample times, not on sample counts."""
    rule = {"type": "threshold", "metric": "tokens_per_second", "below": 1000, "for_seconds": 30}
    engine, clock = make({"slow": rule})
    assert feed(engine, clock, "tokens_per_second", [500] * 6, dt=5) == []
    fired = feed(engine, clock, "tokens_per_second", [500], dt=5)
    assert len(fired) == 1 and fired[0]["attrs"]["direction"] == "below"


def test_rate_rule_per_second_and_per_step() -> None:
    """Rate rules compare the change between samples per second or per step."""
    per_second = {"type": "rate", "metric": "system/memory_used_bytes", "above": 1e8}
    per_step = {"type": "rate", "metric": "lr", "per": "step", "below": -0.01}
    engine, clock = make({"ram_jump": per_second, "lr_drop": per_step})
    fired = feed(engine, clock, "system/memory_used_bytes", [1e9, 1.05e9, 1.5e9], dt=2, rank=-1)
    assert [a["attrs"]["rate"] for a in fired] == [pytest.approx(2.25e8)]
    fired = feed(engine, clock, "lr", [0.1, 0.1, 0.099, 0.05])
    assert [(a["name"], a["step"]) for a in fired] == [("lr_drop", 3)]
    assert fired[0]["attrs"]["rate"] == pytest.approx(-0.049)


def test_zscore_rule_down_and_both() -> None:
    """A user z-score rule on raw values fires on drops (down) or either side (both)."""
    rules = {
        "throughput_drop": {
            "type": "zscore",
            "metric": "tokens_per_second",
            "direction": "down",
            "warmup": 20,
        },
        "step_time_odd": {
            "type": "zscore",
            "metric": "step_time_seconds",
            "direction": "both",
            "warmup": 20,
            "cooldown": 0,
        },
    }
    engine, clock = make(rules)
    rng = random.Random(9)
    values = [10000 + rng.uniform(-100, 100) for _ in range(60)]
    values[40] = 5000
    values[50] = 20000
    fired = feed(engine, clock, "tokens_per_second", values)
    assert [a["step"] for a in fired] == [40]
    times = [0.2 + rng.uniform(-0.005, 0.005) for _ in range(60)]
    times[30], times[45] = 0.1, 0.4
    fired = feed(engine, clock, "step_time_seconds", times)
    assert [a["step"] for a in fired] == [30, 45]
