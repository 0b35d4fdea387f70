"""Histograms the agent computes from samples the probe ships (never on the trainer's side).

A ``tensor`` record with ``"as": "histogram"`` carries a bounded sample of one
tensor's values; one with ``"as": "histograms"`` (what ``probe.watch`` sends)
carries many such samples end to end, with their ``names`` and ``lengths``.
The agent turns each sample into bin edges and counts once, stores that, and
every sink draws the same histogram.
"""

from __future__ import annotations

import math
import sys
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
    with np.errstate(over="ignore", invalid="ignore"):  # past the float range: inf, stored null
        total = float(values.sum())
        # A finite sum means every value is finite: the mask pass is skipped on the common path.
        finite = values
        if not math.isfinite(total):
            finite = values[np.isfinite(values)]
            total = float(finite.sum())
        squares = float(np.dot(finite, finite))
    if finite.size:
        low, high = float(finite.min()), float(finite.max())
        if math.isfinite(high - low):
            counts, edges = _binned(finite, low, high, bins)
        else:  # wider than the largest float (-1e308 and 1e308): binned at half scale
            counts, edges = _binned(finite / 2, low / 2, high / 2, bins)
            edges = edges * 2
    else:
        counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
        low = high = 0.0
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


def _binned(values: Any, low: float, high: float, bins: int) -> tuple[Any, Any]:
    """np.histogram's counts and edges over ``[low, high]``, the sample's own range.

    The same arithmetic as np.histogram's equal-width path, bin for bin, without the
    passes it needs for values outside the range (there are none) and in one block.
    A range that holds fewer floats than bins (np.histogram raises there) is widened
    to the fewest floats that make every bin finite-sized, instead of losing the record.
    """
    if low == high:
        low, high = low - 0.5, high + 0.5
    edges = _edges(low, high, bins)
    if not (edges[1:] > edges[:-1]).all():
        pad = math.ulp(max(abs(low), abs(high))) * bins
        low, high = max(low - pad, -sys.float_info.max), min(high + pad, sys.float_info.max)
        edges = _edges(low, high, bins)
    scaled = np.subtract(values, low)
    scaled /= high - low
    scaled *= bins
    indices = scaled.astype(np.intp)
    np.minimum(indices, bins - 1, out=indices)  # the top edge belongs to the last bin
    # Within a ulp of an edge the division may land one bin off; the edges decide. The
    # last bin's upper bound is infinite: it holds its right edge, nothing moves past it.
    bounds = edges.copy()
    bounds[-1] = math.inf
    indices -= values < bounds[indices]
    indices += values >= bounds[indices + 1]
    return np.bincount(indices, minlength=bins), edges


def _edges(low: float, high: float, bins: int) -> Any:
    """np.linspace(low, high, bins + 1), as np.histogram takes its edges."""
    ramp = np.arange(bins + 1, dtype=np.float64)
    step = (high - low) / bins
    with np.errstate(over="ignore"):  # the last edge may round past the float max: set below
        if step == 0:  # subnormal ranges: np.linspace scales before multiplying
            ramp /= bins
            ramp *= high - low
        else:
            ramp *= step
        ramp += low
    ramp[-1] = high
    return ramp
