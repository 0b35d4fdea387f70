"""Finding sinks by name: the built-ins, an ``outrider.sinks`` entry point, or ``module:Class``.

Built-ins are imported only when configured, so an agent without W&B in its
config never imports wandb.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pydantic

from sinks.base import Sink
from sinks.health import AgentHealth

BUILTIN = {
    "tensorboard": "sinks.tensorboard:TensorBoardSink",
    "prometheus": "sinks.prometheus:PrometheusSink",
    "wandb": "sinks.wandb:WandbSink",
    "otlp": "sinks.otlp:OTLPSink",
    "memory": "sinks.memory:MemorySink",
}
ENTRY_POINT_GROUP = "outrider.sinks"


class SinkConfigError(ValueError):
    """An unknown sink or a bad option; the message names which.

    ``problems`` holds (option path, message) pairs, so a config loader can
    point at the line of each bad option.
    """

    def __init__(self, name: str, problems: list[tuple[tuple[Any, ...], str]]) -> None:
        self.problems = problems
        text = "; ".join(
            f"{'.'.join(map(str, path)) or '(options)'}: {msg}" for path, msg in problems
        )
        super().__init__(f"sink {name!r}: {text}")


@dataclass
class SinkContext:
    """What the agent offers a sink when it is built."""

    runs_dir: Path
    #: the agent's health now; safe to call from any thread (the Prometheus sink's scrapes)
    agent_stats: Callable[[], AgentHealth | None] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class SinkClass(Protocol):
    name: str
    Options: type[pydantic.BaseModel]

    def __call__(self, options: Any, context: SinkContext) -> Sink: ...


def known_names() -> list[str]:
    names = set(BUILTIN)
    names.update(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def resolve(name: str, target: str | None = None) -> SinkClass:
    """The class for sink ``name``; ``target`` ("module:Class") overrides the lookup."""
    spec = target or BUILTIN.get(name)
    if spec is None:
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry_point.name == name:
                return entry_point.load()  # type: ignore[no-any-return]
        message = (
            f"unknown sink; known sinks: {', '.join(known_names())} "
            "(or give `class: module:Class` for your own)"
        )
        raise SinkConfigError(name, [((), message)])
    module_name, _, class_name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        return getattr(module, class_name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise SinkConfigError(name, [((), f"cannot load {spec!r}: {exc}")]) from None


def validate_options(
    name: str, options: dict[str, Any], target: str | None = None
) -> pydantic.BaseModel:
    """Check a sink's options against its ``Options`` model; errors name the option."""
    cls = resolve(name, target)
    try:
        return cls.Options.model_validate(options)
    except pydantic.ValidationError as exc:
        problems = [(tuple(error["loc"]), error["msg"]) for error in exc.errors()]
        raise SinkConfigError(name, problems) from None


def create(
    name: str, options: dict[str, Any], context: SinkContext, target: str | None = None
) -> Sink:
    """Build sink ``name`` from its config options."""
    validated = validate_options(name, options, target)
    return resolve(name, target)(validated, context)
