"""Histograms the agent computes from samples the probe ships (never on the trainer's side).

A ``tensor`` record with ``"as": "histogram"`` carries a bounded sample of one
tensor's values; one with ``"as": "histograms"`` (what ``probe.watch`` sends)
carries many such samples end to end, with their ``names`` and ``lengths``.
The agent turns each sample into bin edges and counts once, stores that, and
every sink draws the same histogram.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from agent.ingest.decode import TENSOR_DTYPES
from probe import protocol

MAX_BINS = protocol.MAX_HISTOGRAM_BINS


def from_tensor(body: dict[str, Any], data: bytes, bins: int) -> dict[str, Any]:
    """Histogram fields (``edges``, ``counts``, min/max/sum/sum_squares/count) of a sample."""
    return _fields(body["name"], _values(body, data), _bins(body, bins))


def from_batch(body: dict[str, Any], data: bytes, bins: int) -> list[dict[str, Any]]:
    """The histogram fields of every sample in a batch record, in ``names`` order."""
    values, bins = _values(body, data), _bins(body, bins)
    fields, start = [], 0
    for name, length in zip(body["names"], body["lengths"], strict=True):
        fields.append(_fields(name, values[start : start + length], bins))
        start += length
    return fields


def _values(body: dict[str, Any], data: bytes) -> Any:
    dtype = body["dtype"]
    if dtype not in TENSOR_DTYPES:
        raise ValueError(f"cannot histogram dtype {dtype}")
    return np.frombuffer(data, dtype=np.dtype(dtype)).astype(np.float64, copy=False)


def _bins(body: dict[str, Any], default: int) -> int:
    """The bins the sender asked for, within 1..MAX_BINS; anything but an integer: the default."""
    bins = body.get("bins")
    return max(1, min(bins if type(bins) is int else default, MAX_BINS))


def _fields(name: str, values: Any, bins: int) -> dict[str, Any]:
    finite = values[np.isfinite(values)]
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        if math.isfinite(high - low):
            # The range np.histogram would take itself: the same bins, two passes fewer.
            counts, edges = np.histogram(finite, bins=bins, range=(low, high))
        else:  # wider than the largest float (-1e308 and 1e308): binned at half scale
            counts, edges = np.histogram(finite / 2, bins=bins, range=(low / 2, high / 2))
            edges = edges * 2
    else:
        counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
        low = high = 0.0
    with np.errstate(over="ignore"):  # past the float range: inf, stored as null
        total, squares = float(finite.sum()), float(np.dot(finite, finite))
    return {
        "name": name,
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "min": low,
        "max": high,
        "sum": total,
        "sum_squares": squares,
        "count": int(finite.size),
        "non_finite": int(values.size - finite.size),
    }
