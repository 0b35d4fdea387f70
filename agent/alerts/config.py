"""The ``alerts:`` section of the agent's YAML, and the built-in rules it starts from.

The built-in rules, their messages and the comments users read are written
once, in ``agent/alerts/defaults.yaml`` (package data). ``DEFAULT_ALERTS_YAML``
is that file's text, shown by ``outrider config --show-default``;
``BUILTIN_RULES`` is its ``rules`` mapping, which every loaded config starts
from, so the documented defaults are the effective ones by construction.
"""

from __future__ import annotations

import importlib.resources
import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Self

import pydantic
import yaml

from agent.alerts.rules import RULE_TYPES, AnySpec
from agent.alerts.webhooks import validate_url
from agent.yamltext import SAFE_LOADER

DEFAULTS_FILE = "defaults.yaml"
BUILTIN_DESTINATIONS = ("log", "store", "sinks")
DEFAULT_DESTINATIONS = ("log", "store", "sinks")
MAX_STATE_KEYS = 10_000


def _builtin_rules(text: str) -> Mapping[str, Mapping[str, Any]]:
    """The ``alerts.rules`` mapping of the defaults file, read-only."""
    try:
        rules = yaml.load(text, Loader=SAFE_LOADER)["alerts"]["rules"]
    except (TypeError, KeyError):
        rules = None
    if not isinstance(rules, dict) or not all(
        isinstance(rule, dict) and "type" in rule for rule in rules.values()
    ):
        raise RuntimeError(f"agent/alerts/{DEFAULTS_FILE}: alerts.rules must map names to rules")
    return types.MappingProxyType(
        {str(name): types.MappingProxyType(rule) for name, rule in rules.items()}
    )


DEFAULT_ALERTS_YAML: str = (
    importlib.resources.files("agent.alerts").joinpath(DEFAULTS_FILE).read_text(encoding="utf-8")
)
BUILTIN_RULES: Mapping[str, Mapping[str, Any]] = _builtin_rules(DEFAULT_ALERTS_YAML)


class WebhookDestination(pydantic.BaseModel):
    """An HTTP(S) endpoint that gets each alert as JSON or as a Slack message."""

    model_config = pydantic.ConfigDict(extra="forbid")

    type: Literal["webhook"]
    url: str
    format: Literal["json", "slack"] = "json"
    timeout_seconds: float = pydantic.Field(default=5.0, gt=0, le=300)
    headers: dict[str, str] = pydantic.Field(default_factory=dict)
    queue_size: int = pydantic.Field(default=100, ge=1, le=100_000)

    @pydantic.field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return validate_url(value)

    @pydantic.field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, item in value.items():
            if not name or any(ch in name for ch in " :\r\n") or any(ch in item for ch in "\r\n"):
                raise ValueError(f"header {name!r}: names are tokens; values have no line breaks")
        return value


RuleConfig = Annotated[AnySpec, pydantic.Field(discriminator="type")]


class AlertsConfig(pydantic.BaseModel):
    """The ``alerts:`` section of the agent's YAML; ``rules`` always holds every built-in."""

    model_config = pydantic.ConfigDict(extra="forbid")

    enabled: bool = True
    default_destinations: list[str] = pydantic.Field(
        default_factory=lambda: list(DEFAULT_DESTINATIONS)
    )
    destinations: dict[str, WebhookDestination] = pydantic.Field(default_factory=dict)
    rules: dict[str, RuleConfig] = pydantic.Field(default_factory=dict)
    max_state_keys: int = pydantic.Field(default=MAX_STATE_KEYS, ge=1)

    @pydantic.model_validator(mode="before")
    @classmethod
    def _with_builtins(cls, data: Any) -> Any:
        """Built-ins under their names, with the YAML's keys over their defaults."""
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        given = data.get("rules")
        given = {} if given is None else given
        if not isinstance(given, Mapping):
            return data
        merged: dict[str, Any] = {}
        for name, default in BUILTIN_RULES.items():
            override = given.get(name)
            override = {} if override is None else override
            kind = default["type"]
            if not isinstance(override, Mapping) or override.get("type", kind) != kind:
                merged[name] = override  # another type: a rule of its own under this name
            else:
                merged[name] = {**default, **override}
        for name, spec in given.items():
            if name in BUILTIN_RULES:
                continue
            if isinstance(spec, Mapping) and "type" not in spec:
                raise ValueError(
                    f"rules.{name}: not a built-in rule, so it needs `type` (one of "
                    f"{', '.join(RULE_TYPES)}) and `metric`; built-in rules: "
                    f"{', '.join(BUILTIN_RULES)}"
                )
            merged[str(name)] = spec
        data["rules"] = merged
        return data

    @pydantic.model_validator(mode="after")
    def _destinations_exist(self) -> Self:
        reserved = [name for name in self.destinations if name in BUILTIN_DESTINATIONS]
        if reserved:
            raise ValueError(f"destinations: {', '.join(reserved)} is built in; pick another name")
        known = [*BUILTIN_DESTINATIONS, *self.destinations]
        wanted = [("default_destinations", self.default_destinations)] + [
            (f"rules.{name}.destinations", spec.destinations or [])
            for name, spec in self.rules.items()
        ]
        for where, names in wanted:
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ValueError(
                    f"{where}: unknown destination {', '.join(map(repr, unknown))}; "
                    f"known: {', '.join(known)}"
                )
        return self
