"""Framework configurations as values the agent accepts: JSON-like and bounded.

The agent refuses a whole config record that holds anything but strings,
numbers, booleans, None, lists and string-keyed maps, nested at most 8 deep,
and a message with a container over 4,096 entries. Framework configs hold
enums, dtypes, paths, tuples and tensors, so they are turned into plain values
here (a tensor described by its shape and dtype, never read), and what is too
large is cut, rather than the run's configuration lost.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MAX_DEPTH = 6  # under the agent's 8, leaving room for the record around it
MAX_ITEMS = 1024  # per list or map, under the agent's 4,096
MAX_CHARS = 4096  # per string: a config value, not a document


def plain_config(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` with every key a string and every value plain (see the module)."""
    return _plain_map(values, 0)


def _plain(value: Any, depth: int) -> Any:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)  # an IntEnum as its number
    if isinstance(value, float):
        number = float(value)
        return number if math.isfinite(number) else str(number)  # run.json is strict JSON
    if isinstance(value, str):
        return value[:MAX_CHARS]  # a str enum as its value; slicing makes a plain str
    if depth >= MAX_DEPTH:
        return _text(value)
    if isinstance(value, Mapping):
        return _plain_map(value, depth + 1)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [_plain(item, depth + 1) for item in list(items)[:MAX_ITEMS]]
    converted = _number(value)
    if converted is not None:
        return converted
    shape = getattr(value, "shape", None)
    if shape is not None and hasattr(value, "dtype"):  # reading its values: a host sync
        return f"{type(value).__name__}(shape={list(shape)}, dtype={value.dtype})"
    return _text(value)


def _plain_map(values: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, item in values.items():
        if len(out) >= MAX_ITEMS:
            break
        out[key if isinstance(key, str) else _text(key)] = _plain(item, depth)
    return out


def _number(value: Any) -> int | float | None:
    """A numpy scalar or an enum of numbers as a plain number; None for anything else."""
    kind = type(value)
    if kind.__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        item = value.item()
        return item if isinstance(item, (int, float)) else None
    return None


def _text(value: Any) -> str:
    """An enum by its value, a function or class by its name, anything else by ``str``."""
    inner = getattr(value, "value", None)
    if isinstance(inner, (str, int, float)) and type(value).__module__ != "builtins":
        return str(inner)[:MAX_CHARS]
    if callable(value) and isinstance(getattr(value, "__qualname__", None), str):
        return str(value.__qualname__)[:MAX_CHARS]
    try:
        return str(value)[:MAX_CHARS]
    except Exception:
        return f"<{type(value).__name__}>"
