"""Histograms the agent computes from samples the probe ships (never on the trainer's side).

A ``tensor`` record with ``"as": "histogram"`` carries a bounded sample of
values; the agent turns it into bin edges and counts once, stores that, and
every sink draws the same histogram.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from agent.decode import TENSOR_DTYPES

MAX_BINS = 512  # W&B's limit, and plenty for TensorBoard


def from_tensor(body: dict[str, Any], data: bytes, bins: int) -> dict[str, Any]:
    """Histogram fields (``edges``, ``counts``, min/max/sum/sum_squares/count) of a sample."""
    dtype = body["dtype"]
    if dtype not in TENSOR_DTYPES:
        raise ValueError(f"cannot histogram dtype {dtype}")
    values = np.frombuffer(data, dtype=np.dtype(dtype)).astype(np.float64, copy=False)
    finite = values[np.isfinite(values)]
    bins = max(1, min(int(body.get("bins") or bins), MAX_BINS))
    if finite.size:
        counts, edges = np.histogram(finite, bins=bins)
        low, high = float(finite.min()), float(finite.max())
    else:
        counts, edges = np.zeros(bins, dtype=np.int64), np.linspace(0.0, 1.0, bins + 1)
        low = high = 0.0
    return {
        "name": body["name"],
        "edges": edges.tolist(),
        "counts": counts.tolist(),
        "min": low,
        "max": high,
        "sum": float(finite.sum()),
        "sum_squares": float(np.dot(finite, finite)),
        "count": int(finite.size),
        "non_finite": int(values.size - finite.size),
    }
