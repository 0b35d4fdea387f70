"""Histogram batches: probe.watch's samples shipped as one record, binned one by one.

The probe concatenates a step's samples (``probe.values.concat_samples``); the
agent splits them by ``lengths`` (``agent.store.histograms.from_batch``) and stores a
line per histogram. Checked against ``np.histogram`` and a resumed run store.
"""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from agent.ingest.decode import Record
from agent.store import histograms
from agent.store.run_store import RunStore
from probe import protocol, values
from tests.helpers import envelope


def batch_body(parts: list[np.ndarray]) -> dict[str, Any]:
    return {
        "name": "histograms",
        "as": "histograms",
        "dtype": "float32",
        "shape": [sum(p.size for p in parts)],
        "names": [f"h{i}" for i in range(len(parts))],
        "lengths": [p.size for p in parts],
    }


def test_each_histogram_of_a_batch_is_np_histogram_of_its_sample() -> None:
    """Every kind of sample: plain, constant, empty, with NaN, all inf."""
    rng = np.random.default_rng(0)
    parts = [
        rng.normal(size=n).astype(np.float32) * scale
        for n, scale in [(1000, 1.0), (7, 1e-3), (8192, 50.0)]
    ]
    parts += [
        np.full(5, 2.5, np.float32),
        np.array([], np.float32),
        np.array([1.0, np.nan, 3.0, np.nan], np.float32),
        np.full(3, np.inf, np.float32),
    ]
    data = np.concatenate(parts).tobytes()
    found = histograms.from_batch(batch_body(parts), data, 16)
    assert [h["name"] for h in found] == [f"h{i}" for i in range(len(parts))]
    for part, got in zip(parts, found, strict=True):
        finite = part.astype(np.float64)[np.isfinite(part)]
        alone = histograms.from_tensor(
            {"name": got["name"], "dtype": "float32"}, part.tobytes(), 16
        )
        assert got == alone, got["name"]
        assert got["count"] == finite.size and got["non_finite"] == part.size - finite.size
        if finite.size:
            counts, edges = np.histogram(finite, bins=16)
            assert got["counts"] == counts.tolist() and got["edges"] == edges.tolist()
            assert (got["min"], got["max"]) == (finite.min(), finite.max())
            assert got["sum"] == pytest.approx(finite.sum())
        else:
            assert sum(got["counts"]) == 0 and got["min"] == got["max"] == 0.0


def test_a_batch_record_is_a_line_per_histogram_and_counted_once_on_resume(
    tmp_path: Path,
) -> None:
    """The store writes each histogram as its own line; a restarted agent resuming the run
    counts the record once (received 2: the batch and one scalars record)."""
    parts = [np.arange(4, dtype=np.float32), np.ones(3, np.float32)]
    body = {**batch_body(parts), "data": np.concatenate(parts).tobytes()}
    env = envelope("resume", "s0")
    store = RunStore(tmp_path, "resume")
    lines = store.add(
        env,
        [
            Record(protocol.TENSOR, 0, time.time(), 5, body),
            Record(protocol.SCALARS, 1, time.time(), 5, {"loss": 1.0}),
        ],
        2,
    )
    store.close()
    assert [(line["kind"], line.get("name")) for line in lines] == [
        ("histogram", "h0"),
        ("histogram", "h1"),
        ("scalars", None),
    ]
    assert all(line["seq"] == 0 and line["step"] == 5 for line in lines[:2])
    assert lines[0]["count"] == 4 and lines[1]["max"] == 1.0
    resumed = RunStore(tmp_path, "resume")
    assert resumed.streams["s0"].received == 2
    resumed.close()


def test_samples_are_grouped_within_the_batch_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most HISTOGRAM_BATCH_NAMES histograms and HISTOGRAM_BATCH_VALUES values a batch
    (one sample alone may fill one), in order, as float32 copies."""
    monkeypatch.setattr(values, "HISTOGRAM_BATCH_NAMES", 3)
    monkeypatch.setattr(values, "HISTOGRAM_BATCH_VALUES", 10)
    samples = [torch.arange(n, dtype=torch.float64) for n in (2, 2, 2, 2, 12, 3)]
    samples[1] = samples[1].to(torch.bfloat16)
    names = [f"s{i}" for i in range(len(samples))]
    batches = values.concat_samples(names, samples)
    assert [(b[0], b[1]) for b in batches] == [
        (["s0", "s1", "s2"], [2, 2, 2]),
        (["s3"], [2]),
        (["s4"], [12]),
        (["s5"], [3]),
    ]
    assert all(vector.dtype == torch.float32 for _, _, vector in batches)
    first = batches[0][2]
    samples[0].add_(100)  # the trainer changes its tensor: the batch is a copy
    assert first.tolist() == [0, 1, 0, 1, 0, 1]


def test_a_sample_wider_than_the_float_range_is_binned() -> None:
    """-1.7e308 and 1.7e308 in one sample (max - min overflows): edges span them, nothing raises."""
    data = np.array([-1.7e308, 0.0, 1.7e308, np.nan], dtype=np.float64)
    body = {"name": "w", "dtype": "float64", "shape": [4]}
    fields = histograms.from_tensor(body, data.tobytes(), 4)
    assert fields["edges"][0] == -1.7e308 and fields["edges"][-1] == 1.7e308
    assert fields["counts"] == [1, 0, 1, 1]
    assert (fields["count"], fields["non_finite"]) == (3, 1)


@pytest.mark.parametrize("bins", ["x", float("nan"), [8], None, 2**40, -3])
def test_bins_that_are_not_a_small_integer_fall_back_or_are_clamped(bins: Any) -> None:
    """A sender's ``bins`` is clamped to 1..512; anything but an integer takes the default."""
    body = {"name": "w", "dtype": "float32", "shape": [3], "bins": bins}
    fields = histograms.from_tensor(body, np.ones(3, dtype=np.float32).tobytes(), 16)
    expected = {2**40: 512, -3: 1}.get(bins, 16) if isinstance(bins, int) else 16
    assert len(fields["counts"]) == expected


def _reference(sample: np.ndarray, bins: int) -> tuple[list[int], list[float]] | None:
    """np.histogram over the sample's finite values; None where np.histogram refuses."""
    finite = sample[np.isfinite(sample)]
    with np.errstate(over="ignore"):
        if finite.size and not np.isfinite(finite.max() - finite.min()):
            return None  # past the float max: np.histogram's edges are NaN
        try:
            counts, edges = np.histogram(finite, bins=bins)
        except ValueError:  # a range holding fewer floats than bins
            return None
    return counts.tolist(), edges.tolist()


@given(
    sample=arrays(
        np.float64,
        st.integers(0, 300),
        elements=st.floats(allow_nan=True, allow_infinity=True, width=64)
        | st.floats(-10, 10)
        | st.sampled_from([0.0, -0.0, 1.0, 5e-324, 1e16]),
    ),
    bins=st.integers(1, protocol.MAX_HISTOGRAM_BINS),
)
def test_binning_is_np_histogram_bin_for_bin(sample: np.ndarray, bins: int) -> None:
    """Any sample and bin count: the counts and edges np.histogram gives, wherever it gives
    any; elsewhere every finite value is counted, in edges that increase."""
    body = {"name": "p", "dtype": "float64", "shape": [sample.size]}
    fields = histograms.from_tensor(body, sample.tobytes(), bins)
    expected = _reference(sample, bins)
    if expected is not None:
        assert (fields["counts"], fields["edges"]) == expected
    assert sum(fields["counts"]) == fields["count"] == int(np.isfinite(sample).sum())
    assert len(fields["edges"]) == bins + 1


@pytest.mark.parametrize(
    "sample",
    [
        [1.7976931348623157e308] * 3,
        [-1.7976931348623157e308, -1.7976931348623157e308],
        [5e-324, 1e-323, 5e-324],
        [4.5e15] * 4,
        [1e16, np.nextafter(1e16, np.inf)],
        [1.0, np.nextafter(1.0, 2.0)],
    ],
    ids=["float-max", "float-min", "subnormal", "large-constant", "two-adjacent", "two-ulps"],
)
def test_a_range_of_fewer_floats_than_bins_is_widened_not_refused(sample: list[float]) -> None:
    """np.histogram raises on these ("too many bins"); the agent bins them in edges that
    increase and keep every value, without a warning."""
    data = np.array(sample, dtype=np.float64)
    body = {"name": "n", "dtype": "float64", "shape": [data.size]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fields = histograms.from_tensor(body, data.tobytes(), 64)
    edges = fields["edges"]
    assert all(a < b for a, b in itertools.pairwise(edges))
    assert edges[0] <= min(sample) and max(sample) <= edges[-1]
    assert sum(fields["counts"]) == len(sample)
    assert (fields["min"], fields["max"]) == (min(sample), max(sample))
