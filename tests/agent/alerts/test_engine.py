"""The alert engine: every built-in rule, the user rule kinds, cooldowns, config errors, bounds."""

from __future__ import annotations

import logging
import math
import random
import re
from collections.abc import Iterable, Mapping
from typing import Any

import pydantic
import pytest
import yaml

from agent.alerts.engine import (
    BUILTIN_RULES,
    DEFAULT_ALERTS_YAML,
    AlertEngine,
    AlertsConfig,
    RuleConfig,
)
from agent.alerts.rules import ZScoreSpec, least_squares_slope
from tests.helpers import REPO

RUN = "run-1"


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    rules: Mapping[str, Any] | None = None,
    *,
    keep: Iterable[str] = (),
    clock: Clock | None = None,
    **section: Any,
) -> tuple[AlertEngine, Clock]:
    """An engine with only the built-ins in ``keep`` plus ``rules``, delivering to store only."""
    clock = clock or Clock()
    keep = set(keep)
    all_rules: dict[str, Any] = {
        name: {"enabled": False} for name in BUILTIN_RULES if name not in keep
    }
    all_rules.update(rules or {})
    section.setdefault("default_destinations", ["store"])
    config = AlertsConfig.model_validate({"rules": all_rules, **section})
    return AlertEngine(config, clock=clock, strict=True), clock


def names(engine: AlertEngine) -> list[str]:
    return [alert["name"] for alert in engine.take_fired()]


def feed(
    engine: AlertEngine,
    clock: Clock,
    metric: str,
    values: Iterable[float],
    *,
    start: int = 0,
    dt: float = 1.0,
    rank: int = 0,
) -> list[dict[str, Any]]:
    """One sample per step and per ``dt`` seconds (sample time = clock); the alerts fired."""
    fired: list[dict[str, Any]] = []
    for step, value in enumerate(values, start=start):
        clock.advance(dt)
        engine.observe(RUN, rank, step, clock.now, {metric: value})
        fired.extend(engine.take_fired())
    return fired


def noisy(base: float, sigma: float, n: int, seed: int = 0, trend: float = 0.0) -> list[float]:
    """``base`` with multiplicative log-normal noise and a relative trend per step."""
    rng = random.Random(seed)
    return [base * math.exp(trend * i + rng.gauss(0.0, sigma)) for i in range(n)]


# -- config ----------------------------------------------------------------------------------------
def test_default_yaml_gives_the_builtin_defaults() -> None:
    """DEFAULT_ALERTS_YAML parses to exactly the default config and spells out every field."""
    section = yaml.safe_load(DEFAULT_ALERTS_YAML)["alerts"]
    assert AlertsConfig.model_validate(section) == AlertsConfig()
    defaults = AlertsConfig()
    assert set(section["rules"]) == set(BUILTIN_RULES) == set(defaults.rules)
    adapter: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RuleConfig)
    for name, raw in section["rules"].items():
        spec = adapter.validate_python(raw)  # the YAML alone, without the built-in merge
        assert spec == defaults.rules[name], name
        assert set(raw) == set(type(spec).model_fields), name
    assert {k for k in section if k != "rules"} == set(AlertsConfig.model_fields) - {"rules"}


def test_docs_yaml_examples_are_valid() -> None:
    """Every `alerts:` YAML block in docs/alerts.md validates, the full example included."""
    text = (REPO / "docs" / "alerts.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if b.startswith("alerts:")]
    assert len(blocks) >= 2
    for block in blocks:
        config = AlertsConfig.model_validate(yaml.safe_load(block)["alerts"])
        AlertEngine(config, strict=True).close(0.1)
    assert config.rules["gpu_memory_full"].type == "threshold"
    spike = config.rules["loss_spike"]
    assert isinstance(spike, ZScoreSpec) and spike.z == 5.0 and spike.warmup == 50


def test_builtin_override_keeps_the_other_defaults() -> None:
    """Naming a built-in changes only the keys given; `enabled: false` removes it."""
    config = AlertsConfig.model_validate(
        {"rules": {"loss_spike": {"z": 6.0}, "stalled": {"enabled": False}}}
    )
    spike = config.rules["loss_spike"]
    assert spike.type == "zscore" and spike.z == 6.0 and spike.warmup == 50 and spike.log
    engine = AlertEngine(config, strict=True)
    assert "stalled" not in {rule.name for rule in engine.rules}
    assert "loss_spike" in {rule.name for rule in engine.rules}


def test_alerts_disabled_means_no_rules() -> None:
    """`enabled: false` for the section: the engine takes input and fires nothing."""
    engine = AlertEngine(AlertsConfig(enabled=False), strict=True)
    engine.observe(RUN, 0, 1, 1.0, {"loss": math.nan})
    assert engine.rules == [] and engine.take_fired() == []


@pytest.mark.parametrize(
    ("section", "needle"),
    [
        ({"rules": {"loss_spike": {"zz": 3}}}, "zz"),
        ({"enable": False}, "enable"),
        ({"rules": {"mine": {"type": "threshold", "metric": "x", "above": 1, "abov": 2}}}, "abov"),
        ({"destinations": {"ops": {"type": "webhook", "url": "http://h", "fmt": "x"}}}, "fmt"),
    ],
)
def test_unknown_field_is_a_config_error(section: dict[str, Any], needle: str) -> None:
    """A typo anywhere in the section is an error that names the key."""
    with pytest.raises(pydantic.ValidationError, match=needle):
        AlertsConfig.model_validate(section)


def test_unknown_destination_is_a_config_error() -> None:
    """Rules and default_destinations may only name log/store/sinks or configured ones."""
    with pytest.raises(pydantic.ValidationError, match="unknown destination 'slak'"):
        AlertsConfig.model_validate({"rules": {"nonfinite": {"destinations": ["slak"]}}})
    with pytest.raises(pydantic.ValidationError, match="default_destinations"):
        AlertsConfig.model_validate({"default_destinations": ["log", "pager"]})
    with pytest.raises(pydantic.ValidationError, match="built in"):
        AlertsConfig.model_validate(
            {"destinations": {"log": {"type": "webhook", "url": "http://h"}}}
        )
    ok = AlertsConfig.model_validate(
        {
            "destinations": {"ops": {"type": "webhook", "url": "https://hooks.example/x"}},
            "rules": {"nonfinite": {"destinations": ["ops", "log"]}},
        }
    )
    assert ok.rules["nonfinite"].destinations == ["ops", "log"]


@pytest.mark.parametrize(
    ("message", "needle"),
    [
        ("{nope}", "unknown field"),
        ("{value:.q}", "does not render"),
        ("{step:d}", "step is None"),
        ("{run.__class__}", "not allowed"),
        ("{0}", "positional"),
        ("{value", "message template"),
    ],
)
def test_bad_template_is_a_config_error(message: str, needle: str) -> None:
    """A template is rendered once with sample values when the config loads."""
    with pytest.raises(pydantic.ValidationError, match=needle):
        AlertsConfig.model_validate({"rules": {"loss_spike": {"message": message}}})


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x", "file:///etc/passwd", "http://", "example.com/hook", "http://a b"],
)
def test_bad_webhook_url_is_a_config_error(url: str) -> None:
    """Only absolute http(s) URLs with a host are accepted."""
    with pytest.raises(pydantic.ValidationError, match="url"):
        AlertsConfig.model_validate({"destinations": {"ops": {"type": "webhook", "url": url}}})


def test_new_rule_needs_type_and_metric() -> None:
    """A name that is not a built-in needs `type`, and metric kinds need `metric`."""
    with pytest.raises(pydantic.ValidationError, match="needs `type`"):
        AlertsConfig.model_validate({"rules": {"loss-spike": {"z": 3}}})
    with pytest.raises(pydantic.ValidationError, match="metric"):
        AlertsConfig.model_validate({"rules": {"hot": {"type": "threshold", "above": 1}}})
    with pytest.raises(pydantic.ValidationError, match="above"):
        AlertsConfig.model_validate({"rules": {"hot": {"type": "threshold", "metric": "x"}}})


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


def test_condition_suppressed_by_cooldown_fires_when_cooldown_ends() -> None:
    """An episode that starts within the cooldown and still holds after it is not lost."""
    engine, clock = make(keep=["nonfinite"])
    engine.observe(RUN, 0, 1, clock.now, {"loss": math.nan})
    engine.observe(RUN, 0, 2, clock.now, {"loss": 1.0})
    engine.observe(RUN, 0, 3, clock.now, {"loss": math.nan})
    assert names(engine) == ["nonfinite"]
    clock.advance(301)
    engine.observe(RUN, 0, 4, clock.now, {"loss": math.nan})
    assert names(engine) == ["nonfinite"]


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
    """Val loss trending up over 5 evaluations while train loss trends down fires."""
    engine, clock = make(keep=["overfitting"])
    train = [2.0 * math.exp(-i / 500) for i in range(1000)]
    val = [2.0, 1.8, 1.7, 1.65, 1.66, 1.7, 1.75, 1.8, 1.86, 1.9]
    fired = _train_and_val(engine, clock, train, val)
    assert fired and fired[0]["name"] == "overfitting"
    first = fired[0]
    assert first["attrs"]["val_slope"] > 0 > first["attrs"]["train_slope"]
    assert first["attrs"]["rise"] >= 0.01
    assert first["step"] >= 699  # needs 5 evaluations of the rising part in its window


def test_overfitting_quiet_when_both_fall_or_both_rise() -> None:
    """Val falling with train, or val rising with train (divergence), is not overfitting."""
    engine, clock = make(keep=["overfitting"])
    train = [2.0 * math.exp(-i / 500) for i in range(1000)]
    val = [2.0 - 0.05 * i for i in range(10)]
    assert _train_and_val(engine, clock, train, val) == []
    engine, clock = make(keep=["overfitting"])
    rising = [1.0 + i / 500 for i in range(1000)]
    assert _train_and_val(engine, clock, rising, [1.0 + 0.1 * i for i in range(10)]) == []


def test_least_squares_slope() -> None:
    """The slope helper the trend rules share is an ordinary least-squares fit."""
    assert least_squares_slope([0, 1, 2, 3], [1, 3, 5, 7]) == pytest.approx(2.0)
    assert least_squares_slope([1, 1], [0, 5]) is None
    assert least_squares_slope([1], [2]) is None


# -- representation_collapse -----------------------------------------------------------------------
def test_representation_collapse_per_stream() -> None:
    """collapse_ratio < 0.1 or effective_rank < 2 fires, once per stream (glob key)."""
    engine, clock = make(keep=["representation_collapse"])
    engine.observe(RUN, 0, 100, clock.now, {"features/h/collapse_ratio": 0.95})
    engine.observe(RUN, 0, 100, clock.now, {"features/h/effective_rank": 120.0})
    assert engine.take_fired() == []
    engine.observe(RUN, 0, 200, clock.now, {"features/h/collapse_ratio": 0.03})
    engine.observe(RUN, 0, 200, clock.now, {"features/z/effective_rank": 1.1})
    engine.observe(RUN, 0, 200, clock.now, {"features/z/feature_norm_mean": 0.0})
    fired = engine.take_fired()
    assert sorted((a["attrs"]["metric"], a["attrs"]["threshold"]) for a in fired) == [
        ("features/h/collapse_ratio", 0.1),
        ("features/z/effective_rank", 2.0),
    ]
    assert fired[0]["severity"] == "error"


def test_representation_collapse_cooldown() -> None:
    """Recovering and collapsing again within 1800 s is suppressed; after it, fires again."""
    engine, clock = make(keep=["representation_collapse"])
    metric = "features/h/collapse_ratio"
    for value, seconds in ((0.05, 0), (0.9, 10), (0.05, 10)):
        clock.advance(seconds)
        engine.observe(RUN, 0, None, clock.now, {metric: value})
    assert names(engine) == ["representation_collapse"]
    assert engine.suppressed() == {"representation_collapse": 1}
    clock.advance(1800)
    engine.observe(RUN, 0, None, clock.now, {metric: 0.9})
    engine.observe(RUN, 0, None, clock.now, {metric: 0.05})
    assert names(engine) == ["representation_collapse"]


# -- memory_leak -----------------------------------------------------------------------------------
RSS = "system/process/4242/rss_bytes"


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


# -- stalled / run_died ----------------------------------------------------------------------------
def _hello(engine: AlertEngine, rank: int = 0, pid: int = 4242) -> None:
    engine.observe_event(RUN, rank, "hello", {"pid": pid})
    engine.observe_event(RUN, rank, "record", {})


def test_stalled_fires_after_silence_and_clears_on_record() -> None:
    """No record for 300 s from a rank fires once; a new record clears the active alert."""
    engine, clock = make(keep=["stalled"])
    _hello(engine, 0)
    _hello(engine, 1)
    clock.advance(299)
    engine.observe_event(RUN, 1, "record", {})
    engine.tick()
    assert engine.take_fired() == []
    clock.advance(1)
    engine.tick()
    engine.tick()
    (alert,) = engine.take_fired()
    assert (alert["rank"], alert["severity"]) == (0, "error")
    assert alert["attrs"]["value"] == pytest.approx(300.0)
    assert engine.active() == [{"name": "stalled", "severity": "error", "run": RUN}]
    engine.observe_event(RUN, 0, "record", {})
    engine.tick()
    assert engine.active() == []


def test_stalled_quiet_after_bye_or_run_end() -> None:
    """A rank that said bye, or a run that ended, is not stalled however quiet."""
    engine, clock = make(keep=["stalled"])
    _hello(engine, 0)
    _hello(engine, 1)
    engine.observe_event(RUN, 0, "bye", {})
    engine.observe_event(RUN, 1, "run_end", {"exit_status": 0})
    engine.observe_event(RUN, 1, "record", {})  # a late straggler of an ended run
    clock.advance(3600)
    engine.tick()
    assert engine.take_fired() == []


def test_stalled_clock_restarts_with_hello() -> None:
    """A rank that says hello again (a restart) is judged from its new first record."""
    engine, clock = make(keep=["stalled"])
    _hello(engine)
    engine.observe_event(RUN, 0, "bye", {})
    clock.advance(1000)
    engine.observe_event(RUN, 0, "hello", {"pid": 1})
    engine.tick()
    clock.advance(299)
    engine.tick()
    assert engine.take_fired() == []
    engine.observe_event(RUN, 0, "record", {})
    clock.advance(300)
    engine.tick()
    assert names(engine) == ["stalled"]


def test_stalled_cooldown() -> None:
    """Stalling again within 1800 s is suppressed; after it, fires again."""
    engine, clock = make(keep=["stalled"])
    _hello(engine)
    clock.advance(300)
    engine.tick()
    engine.observe_event(RUN, 0, "record", {})
    clock.advance(300)
    engine.tick()
    assert names(engine) == ["stalled"] and engine.suppressed() == {"stalled": 1}
    engine.observe_event(RUN, 0, "record", {})
    clock.advance(1800)
    engine.tick()
    assert names(engine) == ["stalled"]


def test_run_died_when_process_gone_without_bye() -> None:
    """process_gone and no bye within the 5 s grace: critical run_died for that rank."""
    engine, clock = make(keep=["run_died"])
    _hello(engine, 2, pid=777)
    engine.observe_event(RUN, -1, "process_gone", {"pid": 777})
    clock.advance(4)
    engine.tick()
    assert engine.take_fired() == []
    clock.advance(1)
    engine.tick()
    (alert,) = engine.take_fired()
    assert (alert["name"], alert["severity"], alert["rank"]) == ("run_died", "critical", 2)
    assert alert["attrs"]["pid"] == 777 and alert["attrs"]["reason"] == "process_gone"
    assert engine.active() == [{"name": "run_died", "severity": "critical", "run": RUN}]
    clock.advance(600)
    assert engine.active() == []


def test_run_died_quiet_when_bye_arrives_within_grace() -> None:
    """The sampler may see the pid vanish before the bye is processed: no alert then."""
    engine, clock = make(keep=["run_died"])
    _hello(engine, 0, pid=99)
    engine.observe_event(RUN, 0, "process_gone", {"pid": 99})
    clock.advance(1)
    engine.observe_event(RUN, 0, "bye", {})
    clock.advance(10)
    engine.tick()
    engine.observe_event(RUN, 0, "run_end", {"exit_status": 0})
    assert engine.take_fired() == []


def test_run_died_on_failed_run_end() -> None:
    """run_end with a non-zero exit status and no bye fires; exit 0, or after bye, does not."""
    engine, _ = make(keep=["run_died"])
    _hello(engine, 0)
    engine.observe_event(RUN, -1, "run_end", {"exit_status": 1})
    (alert,) = engine.take_fired()
    assert alert["attrs"]["exit_status"] == 1 and alert["attrs"]["reason"] == "run_end"
    engine, _ = make(keep=["run_died"])
    _hello(engine, 0)
    engine.observe_event(RUN, -1, "run_end", {"exit_status": 0})
    engine, _ = make(keep=["run_died"])
    _hello(engine, 0)
    engine.observe_event(RUN, 0, "bye", {})
    engine.observe_event(RUN, -1, "run_end", {"exit_status": 137})
    assert engine.take_fired() == []


def test_run_died_cooldown() -> None:
    """Two deaths of the same run/rank within 600 s: one alert, one suppressed."""
    engine, clock = make(keep=["run_died"])
    for _ in range(2):
        _hello(engine, 0)
        engine.observe_event(RUN, 0, "run_end", {"exit_status": 1})
        clock.advance(100)
    assert names(engine) == ["run_died"] and engine.suppressed() == {"run_died": 1}
    clock.advance(600)
    _hello(engine, 0)
    engine.observe_event(RUN, 0, "run_end", {"exit_status": "killed"})
    assert names(engine) == ["run_died"]


# -- probe_drops / sink_failed / series_cap --------------------------------------------------------
def test_probe_drops_fires_on_increase_only() -> None:
    """Cumulative drop counters: fires when one goes up, quiet when unchanged; with cooldown."""
    engine, clock = make(keep=["probe_drops"])
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 0}})
    assert engine.take_fired() == []
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 5, "encode": 0}})
    (alert,) = engine.take_fired()
    assert alert["attrs"]["increase"] == {"queue_full": 5} and alert["attrs"]["value"] == 5
    assert "queue_full +5" in alert["message"]
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 5, "encode": 0}})
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 9}})
    assert engine.take_fired() == [] and engine.suppressed() == {"probe_drops": 1}
    clock.advance(600)
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 10}})
    assert names(engine) == ["probe_drops"]


def test_sink_failed_passes_through_per_sink_with_cooldown() -> None:
    """A sink's failure becomes an error alert to log+store; repeats per sink are held back."""
    engine, clock = make(keep=["sink_failed"])
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "wandb", "message": "401 Unauthorized"})
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "wandb", "message": "401 again"})
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "tensorboard", "message": "disk full"})
    fired = engine.take_fired()
    assert [a["message"] for a in fired] == [
        f"sink wandb failed: 401 Unauthorized (run {RUN})",
        f"sink tensorboard failed: disk full (run {RUN})",
    ]
    assert all(a["destinations"] == ["log", "store"] for a in fired)
    assert engine.suppressed() == {"sink_failed": 1}
    clock.advance(300)
    engine.observe_event(RUN, -1, "sink_failed", {"sink": "wandb", "message": "401"})
    assert names(engine) == ["sink_failed"]


def test_series_cap_passes_the_sink_message() -> None:
    """The Prometheus sink's series-cap alert arrives with its message, once per cooldown."""
    engine, clock = make(keep=["series_cap"])
    attrs = {"name": "prometheus_series_cap", "message": "10000 series exported, the cap"}
    engine.observe_event(RUN, -1, "series_cap", attrs)
    engine.observe_event(RUN, -1, "series_cap", attrs)
    fired = engine.take_fired()
    assert [(a["message"], a["destinations"]) for a in fired] == [
        ("10000 series exported, the cap", ["store"])
    ]
    clock.advance(3600)
    engine.observe_event(RUN, -1, "series_cap", attrs)
    assert names(engine) == ["series_cap"]


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


def test_template_rendering_and_alert_shape() -> None:
    """A custom template renders rule fields; the alert dict has every documented key."""
    rule = {
        "type": "threshold",
        "metric": "val/accuracy",
        "below": 0.5,
        "severity": "info",
        "cooldown": 60,
        "message": "{name} [{severity}]: {metric} {value:.2f} < {threshold} on {run}/{rank} "
        "@{step}",
        "destinations": ["log", "sinks"],
    }
    engine, clock = make({"bad_accuracy": rule})
    engine.observe(RUN, 0, 42, clock.now, {"val/accuracy": 0.25})
    (alert,) = engine.take_fired()
    assert alert == {
        "kind": "alert",
        "name": "bad_accuracy",
        "severity": "info",
        "message": f"bad_accuracy [info]: val/accuracy 0.25 < 0.5 on {RUN}/0 @42",
        "run": RUN,
        "rank": 0,
        "step": 42,
        "attrs": {
            "metric": "val/accuracy",
            "value": 0.25,
            "threshold": 0.5,
            "direction": "below",
            "limit": pytest.approx(math.nan, nan_ok=True),
        },
        "destinations": ["log", "sinks"],
    }
    assert engine.counts() == {("bad_accuracy", "info"): 1}


def test_log_destination_level_follows_severity(caplog: pytest.LogCaptureFixture) -> None:
    """The `log` destination writes to logger outrider.alerts at the alert's severity."""
    engine, clock = make(keep=["nonfinite", "probe_drops"], default_destinations=["log"])
    with caplog.at_level(logging.INFO, logger="outrider.alerts"):
        engine.observe(RUN, 0, 1, clock.now, {"loss": math.nan})
        engine.observe_event(RUN, 0, "probe_stats", {"dropped": {"queue_full": 3}})
    levels = [(r.levelno, r.name) for r in caplog.records]
    assert levels == [
        (logging.CRITICAL, "outrider.alerts"),
        (logging.WARNING, "outrider.alerts"),
    ]


# -- bounds and robustness -------------------------------------------------------------------------
def test_state_is_bounded_and_refusals_counted() -> None:
    """Millions of names matching a glob cannot grow the state past max_state_keys."""
    rule = {"type": "zscore", "metric": "layer/*", "warmup": 2}
    engine, clock = make({"layers": rule}, max_state_keys=100)
    for chunk in range(20):
        metrics = {f"layer/{chunk}/{i}": 1.0 for i in range(1000)}
        engine.observe(RUN, 0, chunk, clock.now, metrics)
    stats = engine.stats()
    assert stats["state_keys"] == 100
    assert stats["state_refused"] == 20 * 1000 - 100
    assert len(engine._match_cache) <= 20_000
    for step in range(5):  # the keys it holds keep working
        engine.observe(RUN, 0, 100 + step, clock.now, {"layer/0/0": 1.0 + 0.01 * (step % 2)})
    engine.observe(RUN, 0, 200, clock.now, {"layer/0/0": 1000.0})
    assert names(engine) == ["layers"]


def test_run_end_frees_state() -> None:
    """A run's state is dropped when it ends, so many runs do not accumulate."""
    engine, clock = make(keep=["loss_spike", "memory_leak"])
    for run in range(50):
        engine.observe(f"run-{run}", 0, 1, clock.now, {"loss": 1.0, RSS: 1e9})
        engine.observe_event(f"run-{run}", -1, "run_end", {"exit_status": 0})
    assert engine.stats()["state_keys"] == 0


def test_odd_input_is_skipped() -> None:
    """Non-numeric values, odd steps and times, and non-mapping attrs do not break the engine."""
    engine, _ = make(keep=["nonfinite", "probe_drops", "run_died"])
    odd: Any = {"loss": "oops", "grad_norm": None}
    engine.observe(RUN, 0, "7", "soon", odd)  # type: ignore[arg-type]
    engine.observe_event(RUN, 0, "probe_stats", {"dropped": ["not", "a", "mapping"]})
    engine.observe_event(RUN, 0, "probe_stats", None)  # type: ignore[arg-type]
    engine.observe_event(RUN, 0, "process_gone", {"pid": "x"})
    engine.observe_event(RUN, 0, "mystery", {})
    engine.tick()
    assert engine.stats()["rule_errors"] == 0


def test_rule_errors_are_counted_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside tests (strict=False) a failing rule is counted and the others keep running."""
    config = AlertsConfig.model_validate({"default_destinations": ["store"]})
    engine = AlertEngine(config, clock=Clock())
    spike = next(rule for rule in engine.rules if rule.name == "loss_spike")

    def broken(*args: Any) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(spike, "on_sample", broken)
    engine.observe(RUN, 0, 1, 1.0, {"loss": math.nan})
    assert names(engine) == ["nonfinite"]
    assert engine.stats()["rule_errors"] == 1


def test_fired_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Alerts nobody takes are capped; the oldest go first, counted."""
    monkeypatch.setattr("agent.alerts.engine.MAX_FIRED", 5)
    engine, clock = make({"any": {"type": "threshold", "metric": "m/*", "above": 0, "cooldown": 0}})
    engine.observe(RUN, 0, 1, clock.now, {f"m/{i}": 1.0 for i in range(8)})
    fired = engine.take_fired()
    assert [a["attrs"]["metric"] for a in fired] == [f"m/{i}" for i in range(3, 8)]
    assert engine.stats()["fired_dropped"] == 3
