"""Alert rule kinds: what the YAML may say about each, and the state machine that runs it.

By family: ``metrics`` (threshold, rate, zscore, nonfinite: any metric),
``training`` (plateau, overfitting, collapse, trend, input_bound: what a
training run's metrics mean), ``divergence`` (a loss climbing away from its
best), ``checkpoints`` (checkpoint_missing: saves that stopped), ``events``
(stalled, run_died, probe_drops, event: liveness and passed-through alarms);
``base`` holds what they share.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.alerts.rules.base import (
    PROCESS_GONE,
    RECORD,
    Context,
    MetricRule,
    MetricRuleSpec,
    RankInfo,
    Rule,
    RuleSpec,
    Severity,
    least_squares_slope,
)
from agent.alerts.rules.checkpoints import CheckpointMissingRule, CheckpointMissingSpec
from agent.alerts.rules.divergence import DivergenceRule, DivergenceSpec
from agent.alerts.rules.events import (
    EventRule,
    EventSpec,
    ProbeDropsRule,
    ProbeDropsSpec,
    RunDiedRule,
    RunDiedSpec,
    StalledRule,
    StalledSpec,
)
from agent.alerts.rules.metrics import (
    NonfiniteRule,
    NonfiniteSpec,
    RateRule,
    RateSpec,
    ThresholdRule,
    ThresholdSpec,
    ZScoreRule,
    ZScoreSpec,
)
from agent.alerts.rules.patterns import MetricPattern
from agent.alerts.rules.templates import COMMON_FIELDS, check_template
from agent.alerts.rules.training import (
    CollapseRule,
    CollapseSpec,
    InputBoundRule,
    InputBoundSpec,
    OverfittingRule,
    OverfittingSpec,
    PlateauRule,
    PlateauSpec,
    TrendRule,
    TrendSpec,
)

#: every spec a rule in ``alerts.rules`` may be, told apart by its ``type``
AnySpec = (
    ThresholdSpec
    | RateSpec
    | ZScoreSpec
    | NonfiniteSpec
    | PlateauSpec
    | OverfittingSpec
    | DivergenceSpec
    | CollapseSpec
    | TrendSpec
    | InputBoundSpec
    | StalledSpec
    | RunDiedSpec
    | ProbeDropsSpec
    | EventSpec
    | CheckpointMissingSpec
)

#: the rule class that runs each ``type``
RULE_TYPES: Mapping[str, type[Rule[Any]]] = {
    "threshold": ThresholdRule,
    "rate": RateRule,
    "zscore": ZScoreRule,
    "nonfinite": NonfiniteRule,
    "plateau": PlateauRule,
    "overfitting": OverfittingRule,
    "divergence": DivergenceRule,
    "collapse": CollapseRule,
    "trend": TrendRule,
    "input_bound": InputBoundRule,
    "stalled": StalledRule,
    "run_died": RunDiedRule,
    "probe_drops": ProbeDropsRule,
    "event": EventRule,
    "checkpoint_missing": CheckpointMissingRule,
}

__all__ = [
    "COMMON_FIELDS",
    "PROCESS_GONE",
    "RECORD",
    "RULE_TYPES",
    "AnySpec",
    "CheckpointMissingRule",
    "CheckpointMissingSpec",
    "CollapseRule",
    "CollapseSpec",
    "Context",
    "DivergenceRule",
    "DivergenceSpec",
    "EventRule",
    "EventSpec",
    "InputBoundRule",
    "InputBoundSpec",
    "MetricPattern",
    "MetricRule",
    "MetricRuleSpec",
    "NonfiniteRule",
    "NonfiniteSpec",
    "OverfittingRule",
    "OverfittingSpec",
    "PlateauRule",
    "PlateauSpec",
    "ProbeDropsRule",
    "ProbeDropsSpec",
    "RankInfo",
    "RateRule",
    "RateSpec",
    "Rule",
    "RuleSpec",
    "RunDiedRule",
    "RunDiedSpec",
    "Severity",
    "StalledRule",
    "StalledSpec",
    "ThresholdRule",
    "ThresholdSpec",
    "TrendRule",
    "TrendSpec",
    "ZScoreRule",
    "ZScoreSpec",
    "check_template",
    "least_squares_slope",
]
