"""``plain_config``: framework configurations turned into what the agent stores."""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

import probe
from probe.integrations.plain import MAX_DEPTH, MAX_ITEMS, plain_config
from tests.helpers import run_info, stop_agent


class Strategy(str, enum.Enum):  # noqa: UP042  # the form transformers uses (ExplicitEnum)
    STEPS = "steps"


class Level(enum.IntEnum):
    HIGH = 3


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"leaf": 1}
    for _ in range(depth):
        value = {"inner": value}
    return value


def test_values_become_plain() -> None:
    """Enums by value, dtypes and paths as text, tuples and sets as lists, numpy scalars as
    numbers, non-finite floats as text, non-string keys as text."""
    got = plain_config(
        {
            "strategy": Strategy.STEPS,
            "level": Level.HIGH,
            "dtype": torch.bfloat16,
            "path": Path("/tmp/out"),
            "betas": (0.9, 0.999),
            "tags": {"b", "a"},
            "count": np.int64(7),
            "ratio": np.float32(0.5),
            "limit": math.inf,
            "id2label": {0: "neg", 1: "pos"},
            "none": None,
        }
    )
    assert got == {
        "strategy": "steps",
        "level": 3,
        "dtype": "torch.bfloat16",
        "path": "/tmp/out",
        "betas": [0.9, 0.999],
        "tags": ["a", "b"],
        "count": 7,
        "ratio": 0.5,
        "limit": "inf",
        "id2label": {"0": "neg", "1": "pos"},
        "none": None,
    }
    assert type(got["strategy"]) is str and type(got["level"]) is int


def test_large_configs_are_cut_and_stored(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """Too deep, too long: cut to what the agent accepts, so the rest of the configuration
    is still stored (the agent refuses a whole record it cannot take)."""
    got = plain_config({"deep": nested(20), "long": list(range(10_000)), "lr": 0.1})
    assert len(got["long"]) == MAX_ITEMS
    depth, value = 0, got["deep"]
    while isinstance(value, dict):
        depth, value = depth + 1, value.get("inner", value.get("leaf"))
    assert depth == MAX_DEPTH and isinstance(value, str)
    probe.init(endpoint, run_id="plain")
    probe.config(got)
    probe.finish()
    assert stop_agent(agent) == 0
    assert run_info(runs_dir / "plain")["config"] == got
