"""Sinks that fail on purpose, loadable by the agent as ``class: tests.faulty_sinks:Name``.

A real sink cannot be made to raise or hang on demand, so these stand in for
a broken disk, a dead server, a wedged client library.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pydantic

from sinks.base import Batch, Sink


class _NoOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")


class RaisingSink(Sink):
    """Every export raises, like a sink whose server is down."""

    name = "raising"
    Options = _NoOptions

    def __init__(self, options: Any = None, context: Any = None) -> None:
        self.calls = 0

    def export(self, batches: Sequence[Batch]) -> None:
        self.calls += 1
        raise ConnectionError("the collector is down")


class HangingSink(Sink):
    """The first export never returns (until released), like a wedged client library."""

    name = "hanging"
    Options = _NoOptions

    def __init__(self, options: Any = None, context: Any = None) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()

    def export(self, batches: Sequence[Batch]) -> None:
        self.entered.set()
        self.release.wait()
