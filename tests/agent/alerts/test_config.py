"""The `alerts:` section: built-in defaults from agent/alerts/defaults.yaml, overrides, errors."""

from __future__ import annotations

import math
import re
from typing import Any

import pydantic
import pytest
import yaml

from agent.alerts.config import BUILTIN_RULES, DEFAULT_ALERTS_YAML, AlertsConfig, RuleConfig
from agent.alerts.engine import AlertEngine
from agent.alerts.rules import RULE_TYPES, ZScoreSpec
from agent.alerts.rules.advice import DEFAULT_ADVICE
from tests.agent.alerts.helpers import RUN
from tests.helpers import REPO

# Every built-in rule's effective settings, spelled out: an edit of defaults.yaml that changes
# one (a threshold, a cooldown, a message) has to be made here too, on purpose. Its `advice`
# (prose) is checked by test_every_builtin_rule_has_advice instead.
BUILTIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "nonfinite": {
        "type": "nonfinite",
        "severity": "critical",
        "cooldown": 300.0,
        "message": (
            "non-finite loss or gradients: {metric}={value} (run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": ["loss", "val/loss", "grad_norm"],
        "flags": ["loss_nonfinite", "grad_nonfinite"],
    },
    "loss_spike": {
        "type": "zscore",
        "severity": "warning",
        "cooldown": 300.0,
        "message": (
            "loss spike: {metric}={value:.4g} is {zscore:.1f} standard deviations above "
            "its moving mean {mean:.4g} (run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "loss",
        "z": 4.0,
        "alpha": 0.02,
        "warmup": 50,
        "log": True,
        "direction": "up",
        "min_std": 0.01,
        "above": None,
    },
    "grad_explosion": {
        "type": "zscore",
        "severity": "error",
        "cooldown": 300.0,
        "message": (
            "gradient explosion: {metric}={value:.4g} (moving mean {mean:.4g}, z "
            "{zscore:.1f}, limit {threshold:.4g}) (run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "grad_norm",
        "z": 5.0,
        "alpha": 0.02,
        "warmup": 50,
        "log": True,
        "direction": "up",
        "min_std": 0.4606,
        "above": 10000.0,
    },
    "grad_vanishing": {
        "type": "threshold",
        "severity": "warning",
        "cooldown": 1800.0,
        "message": (
            "vanishing gradients: {metric}={value:.3g} has stayed below {threshold:.3g} "
            "(run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "grad_norm",
        "above": None,
        "below": 1e-07,
        "for_steps": 100,
        "for_seconds": 0.0,
        "limit_metric": None,
        "limit_fraction": None,
    },
    "loss_plateau": {
        "type": "plateau",
        "severity": "info",
        "cooldown": 1800.0,
        "message": (
            "loss plateau: {metric} has not improved on its best {best:.4g} for "
            "{bad_evaluations} evaluations; ReduceLROnPlateau would lower the learning "
            "rate now (run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "val/loss",
        "fallback_metric": "loss",
        "mode": "min",
        "patience": 10,
        "threshold": 0.0001,
        "threshold_mode": "rel",
        "cooldown_evaluations": 0,
        "window": 1,
        "fallback_window": 100,
    },
    "overfitting": {
        "type": "overfitting",
        "severity": "warning",
        "cooldown": 3600.0,
        "message": (
            "overfitting: {metric} has stayed above its best {best:.4g} for {streak} "
            "evaluations (now {value:.4g}, +{rise:.1%}) while {train_metric} fell "
            "{train_fall:.1%} (run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "val/loss",
        "train_metric": "loss",
        "evaluations": 4,
        "min_rise": 0.03,
        "train_min_fall": 0.02,
        "shock_factor": 3.0,
    },
    "loss_divergence": {
        "type": "divergence",
        "severity": "error",
        "cooldown": 1800.0,
        "message": (
            "loss divergence: smoothed {metric} is {ratio:.1f} times its best {best:.4g} and "
            "rising (now {smoothed:.4g}); the learning rate is not being cut (lr {lr_trend}) "
            "(run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "loss",
        "factor": 2.0,
        "smooth": 15,
        "window": 50,
        "rising_fraction": 0.8,
        "min_rise": 0.1,
        "lr_metric": "lr",
        "lr_cut": 0.2,
    },
    "val_loss_divergence": {
        "type": "divergence",
        "severity": "error",
        "cooldown": 1800.0,
        "message": (
            "val loss divergence: {metric} is {ratio:.1f} times its best {best:.4g} and "
            "rising (now {smoothed:.4g}); the learning rate is not being cut (lr {lr_trend}) "
            "(run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "val/loss",
        "factor": 2.0,
        "smooth": 1,
        "window": 4,
        "rising_fraction": 0.8,
        "min_rise": 0.1,
        "lr_metric": "lr",
        "lr_cut": 0.2,
    },
    "representation_collapse": {
        "type": "collapse",
        "severity": "error",
        "cooldown": 1800.0,
        "message": (
            "representation collapse in {stream}: {detail} (run {run}, rank {rank}, step {step})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": [
            "features/*/mean_pairwise_cosine",
            "features/*/collapse_ratio",
            "features/*/centered_effective_rank",
        ],
        "warmup_batches": 0,
        "baseline_batches": 5,
        "cosine_above": 0.9,
        "std_fraction": 0.35,
        "rank_fraction": 0.35,
        "effective_rank_below": None,
        "collapse_ratio_below": None,
        "for_steps": 1,
    },
    "memory_leak": {
        "type": "trend",
        "severity": "warning",
        "cooldown": 3600.0,
        "message": (
            "memory leak? {metric} grew {growth:.1%} ({slope:.3g} bytes/s) over the last "
            "{window_seconds:.0f} s, now {value:.4g} bytes (run {run}, rank {rank})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": ["system/process/*/rss_bytes", "cuda_memory_allocated_bytes"],
        "slope_above": 65536.0,
        "min_growth_fraction": 0.05,
        "window_seconds": 900.0,
        "warmup_seconds": 300.0,
        "buckets": 60,
    },
    "gpu_temperature": {
        "type": "threshold",
        "severity": "warning",
        "cooldown": 900.0,
        "message": (
            "GPU too hot: {metric}={value:.0f} C has stayed above {threshold:.0f} C (run {run})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "system/gpu*/temperature_c",
        "above": 85.0,
        "below": None,
        "for_steps": 1,
        "for_seconds": 60.0,
        "limit_metric": None,
        "limit_fraction": None,
    },
    "gpu_power": {
        "type": "threshold",
        "severity": "info",
        "cooldown": 1800.0,
        "message": (
            "GPU at its power cap: {metric}={value:.0f} W has stayed above {threshold:.0f} "
            "W (run {run})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "system/gpu*/power_watts",
        "above": None,
        "below": None,
        "for_steps": 1,
        "for_seconds": 300.0,
        "limit_metric": "power_limit_watts",
        "limit_fraction": 0.98,
    },
    "input_bound": {
        "type": "input_bound",
        "severity": "warning",
        "cooldown": 1800.0,
        "message": (
            "input bound: rank {worst_rank} waits for data {wait_fraction:.0%} of each "
            "step while GPU utilisation is at most {util:.0f}% (run {run})"
        ),
        "destinations": None,
        "enabled": True,
        "metric": "data_wait_seconds",
        "step_time_metric": "step_time_seconds",
        "util_metric": "system/gpu*/util_percent",
        "util_below": 50.0,
        "wait_fraction_above": 0.3,
        "smoothing": 0.1,
        "for_seconds": 120.0,
    },
    "stalled": {
        "type": "stalled",
        "severity": "error",
        "cooldown": 1800.0,
        "message": ("run stalled: no record from run {run} rank {rank} for {value:.0f} s"),
        "destinations": None,
        "enabled": True,
        "after_seconds": 300.0,
    },
    "run_died": {
        "type": "run_died",
        "severity": "critical",
        "cooldown": 600.0,
        "message": (
            "run died: run {run} rank {rank} ended without a bye ({reason}, exit status "
            "{exit_status}, pid {pid})"
        ),
        "destinations": None,
        "enabled": True,
        "grace_seconds": 5.0,
    },
    "probe_drops": {
        "type": "probe_drops",
        "severity": "warning",
        "cooldown": 600.0,
        "message": ("the probe of run {run} rank {rank} dropped records: {reasons}"),
        "destinations": None,
        "enabled": True,
    },
    "sink_failed": {
        "type": "event",
        "severity": "error",
        "cooldown": 300.0,
        "message": "sink {source} failed: {detail} (run {run})",
        "destinations": ["log", "store"],
        "enabled": True,
        "event": "sink_failed",
        "key_attr": "sink",
    },
    "too_many_metrics": {
        "type": "event",
        "severity": "warning",
        "cooldown": 86400.0,
        "message": "{detail}",
        "destinations": None,
        "enabled": True,
        "event": "too_many_metrics",
        "key_attr": None,
    },
    "series_cap": {
        "type": "event",
        "severity": "warning",
        "cooldown": 3600.0,
        "message": "{detail}",
        "destinations": None,
        "enabled": True,
        "event": "series_cap",
        "key_attr": None,
    },
    "store_failed": {
        "type": "event",
        "severity": "critical",
        "cooldown": 600.0,
        "message": "run store failed: {detail} (run {run})",
        "destinations": None,
        "enabled": True,
        "event": "store_failed",
        "key_attr": None,
    },
    "checkpoint_failed": {
        "type": "event",
        "severity": "error",
        "cooldown": 300.0,
        "message": "checkpoint failed its check: {detail} (run {run}, rank {rank})",
        "destinations": None,
        "enabled": True,
        "event": "checkpoint_failed",
        "key_attr": "path",
    },
    "checkpoint_missing": {
        "type": "checkpoint_missing",
        "severity": "warning",
        "cooldown": 1800.0,
        "message": "checkpoint missing: no good checkpoint for {value:.0f} {unit} (expected "
        "every {every:g} {unit}, {source}); last good: {since} (run {run}, rank {rank}, step "
        "{step})",
        "destinations": None,
        "enabled": True,
        "every_steps": None,
        "every_seconds": None,
        "factor": 1.5,
    },
}


def test_builtin_rules_keep_their_effective_defaults() -> None:
    """Names, kinds, metrics, thresholds, cooldowns and messages of the built-ins are pinned."""
    effective = {
        name: spec.model_dump(exclude={"advice"}) for name, spec in AlertsConfig().rules.items()
    }
    assert list(effective) == list(BUILTIN_DEFAULTS)
    for name, expected in BUILTIN_DEFAULTS.items():
        assert effective[name] == expected, name
    top = AlertsConfig().model_dump(exclude={"rules"})
    assert top == {
        "enabled": True,
        "default_destinations": ["log", "store", "sinks"],
        "destinations": {},
        "max_state_keys": 10000,
    }


def test_every_builtin_rule_has_advice() -> None:
    """Each built-in carries its own advice from defaults.yaml, and its engine rule passes it on."""
    config = AlertsConfig()
    engine = AlertEngine(config, strict=True)
    for name, raw in BUILTIN_RULES.items():
        spec = config.rules[name]
        assert isinstance(raw.get("advice"), str) and len(raw["advice"]) >= 40, name
        assert spec.advice == " ".join(raw["advice"].split()), name
        assert spec.guidance != DEFAULT_ADVICE[spec.type], f"{name}: the kind's generic advice"
    assert {rule.name: rule.advice for rule in engine.rules} == {
        name: spec.guidance for name, spec in config.rules.items()
    }
    engine.close(0.1)


def test_user_rules_get_their_kinds_advice_unless_given() -> None:
    """A rule without advice gets its kind's default; given advice is kept; blank is an error."""
    assert set(DEFAULT_ADVICE) == set(RULE_TYPES)
    rules: dict[str, Any] = {
        "slow": {"type": "threshold", "metric": "step_time_seconds", "above": 2.0},
        "slow_too": {
            "type": "threshold",
            "metric": "step_time_seconds",
            "above": 3.0,
            "advice": "  Page the\n  data team. ",
        },
    }
    config = AlertsConfig.model_validate({"rules": rules})
    assert config.rules["slow"].guidance == DEFAULT_ADVICE["threshold"]
    assert config.rules["slow_too"].guidance == "Page the data team."
    for bad, needle in (("   ", "advice is blank"), ("x" * 1001, "at most 1000")):
        with pytest.raises(pydantic.ValidationError, match=needle):
            AlertsConfig.model_validate({"rules": {"slow": {**rules["slow"], "advice": bad}}})


def test_default_alerts_yaml_is_the_package_file() -> None:
    """DEFAULT_ALERTS_YAML and BUILTIN_RULES are read from agent/alerts/defaults.yaml."""
    text = (REPO / "agent" / "alerts" / "defaults.yaml").read_text()
    assert text == DEFAULT_ALERTS_YAML
    assert yaml.safe_load(text)["alerts"]["rules"] == BUILTIN_RULES
    with pytest.raises(TypeError):
        BUILTIN_RULES["loss_spike"]["z"] = 1.0  # type: ignore[index]


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


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        ("loss_plateau", "metric"),
        ("loss_plateau", "fallback_metric"),
        ("overfitting", "train_metric"),
        ("input_bound", "step_time_metric"),
    ],
)
def test_single_metric_fields_refuse_globs(rule: str, field: str) -> None:
    """Fields that name one metric reject a glob or a blank name, naming the field."""
    for bad in ("val/*", " "):
        with pytest.raises(pydantic.ValidationError, match=f"{field}(.|\n)*exact metric name"):
            AlertsConfig.model_validate({"rules": {rule: {field: bad}}})
