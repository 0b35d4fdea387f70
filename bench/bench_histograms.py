"""Agent CPU per histogram record: the agent's binning against plain np.histogram.

Why: on a watched model the agent's receive loop spends most of its warm CPU
binning ``probe.watch``'s histogram batches (one record a histogram step, a
sample of up to 8,192 values per parameter and gradient). The agent bins
with np.histogram's own arithmetic, bin for bin, without the passes that
np.histogram needs for values outside the range and for non-finite values
(there are none in the common case). Both are timed on the same batch, in
interleaved rounds, so machine noise hits both alike; the results are
checked equal before any timing.

    python bench/bench_histograms.py            # ~20 s
    python bench/bench_histograms.py --quick    # ~5 s
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import machine, print_table

from agent.store import histograms
from probe import values

BINS = 64
Histograms = list[tuple[list[int], list[float]]]


def watch_batch(parameters: int, seed: int = 0) -> tuple[dict[str, Any], bytes]:
    """A batch like probe.watch's for a model of ``parameters`` tensors: weights and grads."""
    rng = np.random.default_rng(seed)
    parts = [
        (rng.normal(size=values.HISTOGRAM_SAMPLE) * scale).astype(np.float32)
        for scale in rng.uniform(1e-3, 1.0, size=2 * parameters)
    ]
    body = {
        "name": "histograms",
        "as": "histograms",
        "dtype": "float32",
        "shape": [sum(p.size for p in parts)],
        "names": [f"h{i}" for i in range(len(parts))],
        "lengths": [p.size for p in parts],
    }
    return body, np.concatenate(parts).tobytes()


def numpy_batch(body: dict[str, Any], data: bytes, bins: int) -> Histograms:
    """The straightforward way to the same fields: mask the finite values, np.histogram over
    their range, their sum and sum of squares."""
    sample = np.frombuffer(data, dtype=np.float32).astype(np.float64)
    found, start = [], 0
    for length in body["lengths"]:
        part = sample[start : start + length]
        finite = part[np.isfinite(part)]
        counts, edges = np.histogram(finite, bins=bins, range=(finite.min(), finite.max()))
        finite.sum(), np.dot(finite, finite)
        found.append((counts.tolist(), edges.tolist()))
        start += length
    return found


def agent_batch(body: dict[str, Any], data: bytes, bins: int) -> Histograms:
    return [(h["counts"], h["edges"]) for h in histograms.from_batch(body, data, bins)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--parameters", type=int, default=20, help="tensors in the model")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="50 rounds")
    args = parser.parse_args()
    rounds = 50 if args.quick else args.rounds
    body, data = watch_batch(args.parameters)
    contenders: dict[str, Callable[..., Any]] = {
        "np.histogram": numpy_batch,
        "agent": agent_batch,
    }
    if numpy_batch(body, data, BINS) != agent_batch(body, data, BINS):
        raise SystemExit("the agent's histograms differ from np.histogram's")
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(rounds):
        order = list(contenders.items())
        if round_ % 2:
            order.reverse()
        for name, binning in order:
            start = time.perf_counter()
            binning(body, data, BINS)
            times[name].append(time.perf_counter() - start)
    print(machine())
    values_per_record = body["shape"][0]
    print(
        f"a record of {len(body['names'])} samples, {values_per_record:,} values, "
        f"{BINS} bins; median of {rounds} interleaved rounds"
    )
    base = statistics.median(times["np.histogram"])
    rows = []
    for name, taken in times.items():
        median = statistics.median(taken)
        rows.append(
            [
                name,
                f"{median * 1e3:.2f}",
                f"{values_per_record / median / 1e6:.1f}",
                f"{base / median:.2f}x",
            ]
        )
    print_table(["binning", "ms/record", "M values/s", "speed"], rows)


if __name__ == "__main__":
    main()
