"""The TensorBoard sink, read back with TensorBoard's own event reader."""

from __future__ import annotations

import html
import json
import math
import os
import struct
import subprocess
import sys
import threading
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard import data_compat
from tensorboard.backend.event_processing import event_accumulator, event_multiplexer
from tensorboard.plugins.text import text_plugin

from agent import histograms
from sinks import registry
from sinks.base import Batch, Source
from sinks.tensorboard import TensorBoardSink
from sinks.worker import Health, SinkWorker
from tests.helpers import PYTHON, wait_for

EVERYTHING = dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)  # 0: keep every event
ROOT = Path(__file__).resolve().parent.parent


def f32(value: float) -> float:
    """``value`` as TensorBoard stores a scalar (float32)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def png(width: int, height: int, color_type: int = 2, seed: int = 0) -> bytes:
    """A valid 8-bit PNG (RGB or RGBA), built by hand so no imaging library is needed."""
    channels = {2: 3, 6: 4}[color_type]
    rows = b"".join(
        b"\x00" + bytes((seed + x * 31 + y * 17 + c * 7) % 256 for x in range(width) for c in range(channels))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def source(run: str = "run-1", rank: int = 0, world_size: int = 1) -> Source:
    return Source(
        run=run,
        stream=f"stream-{rank}",
        rank=rank,
        local_rank=rank,
        world_size=world_size,
        host="host",
        pid=1000 + rank,
    )


def entry(kind: str, step: int | None = None, t: float = 1_700_000_000.5, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "step": step, "rank": 0, "t": t, "stream": "s", "seq": 0, **fields}


def batch(run_dir: Path, *entries: dict[str, Any], **where: Any) -> Batch:
    return Batch(source=source(**where), entries=list(entries), run_dir=str(run_dir))


def read(directory: Path) -> event_accumulator.EventAccumulator:
    """Everything TensorBoard's reader finds in ``directory`` (not its subdirectories)."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance=EVERYTHING)
    accumulator.Reload()
    return accumulator


def read_when(directory: Path, ready: Callable[[Any], bool], timeout: float = 10.0) -> Any:
    """Poll ``directory`` with TensorBoard's reader until ``ready(accumulator)`` holds."""

    def attempt() -> Any:
        if not directory.is_dir():
            return None
        accumulator = read(directory)
        return accumulator if ready(accumulator) else None

    return wait_for(attempt, timeout, f"TensorBoard data in {directory}")


def has_scalars(*tags: str, count: int = 1) -> Callable[[Any], bool]:
    def ready(accumulator: Any) -> bool:
        present = accumulator.Tags()["scalars"]
        return all(tag in present and len(accumulator.Scalars(tag)) >= count for tag in tags)

    return ready


def text_of(accumulator: Any, tag: str) -> list[str]:
    return [event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(tag)]


def rendered(text: str) -> str:
    """``text`` as TensorBoard's text dashboard shows it (its Markdown + sanitizer)."""
    return str(text_plugin.text_array_to_html(np.array(text.encode()), enable_markdown=True))


def writer_threads() -> int:
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


@pytest.fixture
def make_sink() -> Iterator[Callable[..., TensorBoardSink]]:
    """Build sinks with options; every one is closed after the test."""
    sinks: list[TensorBoardSink] = []

    def make(**options: Any) -> TensorBoardSink:
        sink = TensorBoardSink(TensorBoardSink.Options(**options))
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        sink.close(5.0)


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "runs" / "run-1"
    path.mkdir(parents=True)
    return path


def test_scalars_through_a_worker_keep_steps_wall_times_and_non_finite_values(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Scalars sent through a real SinkWorker read back with exact steps, times and NaN/Inf."""
    worker = SinkWorker(make_sink(), flush_interval=0.1)
    try:
        worker.submit(
            batch(
                run_dir,
                entry("scalars", 0, t=1000.25, metrics={"loss": 1.5, "lr": 0.1, "tokens": 3}),
                entry("scalars", 1, t=1001.5, metrics={"loss": "NaN", "lr": "Infinity"}),
            )
        )
        worker.submit(
            batch(
                run_dir,
                entry("scalars", 2, t=1002.75, metrics={"loss": 0.25, "lr": "-Infinity"}),
            )
        )
        accumulator = read_when(run_dir / "tensorboard", has_scalars("loss", "lr", count=3))
    finally:
        assert worker.close(10.0)
    loss = accumulator.Scalars("loss")
    assert [e.step for e in loss] == [0, 1, 2]
    assert [e.wall_time for e in loss] == [1000.25, 1001.5, 1002.75]
    assert loss[0].value == f32(1.5) and math.isnan(loss[1].value) and loss[2].value == 0.25
    assert [e.value for e in accumulator.Scalars("lr")] == [f32(0.1), math.inf, -math.inf]
    assert [(e.step, e.value) for e in accumulator.Scalars("tokens")] == [(0, 3.0)]
    assert worker.stats.failures == 0 and worker.sink.skipped == 0  # type: ignore[attr-defined]


def test_entries_without_a_step_take_consecutive_steps_per_run(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Step-less entries get 0, 1, 2, ... from one counter per run directory."""
    sink = make_sink()
    sink.export([batch(run_dir, *(entry("scalars", None, metrics={"x": float(i)}) for i in range(3)))])
    sink.export([batch(run_dir, entry("scalars", None, metrics={"x": 3.0}))])
    scalars = read(run_dir / "tensorboard").Scalars("x")
    assert [(e.step, e.value) for e in scalars] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]


def test_histogram_keeps_bucket_limits_counts_and_statistics(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """edges/counts become TensorBoard's right-edge buckets; min/max/sum/count are kept exactly."""
    sink = make_sink()
    fields = {
        "name": "weights/layer1",
        "edges": [-1.0, -0.5, 0.0, 0.5, 1.0],
        "counts": [1, 0, 7, 2],
        "min": -0.9,
        "max": 0.75,
        "sum": 1.125,
        "sum_squares": 2.5,
        "count": 10,
    }
    sink.export([batch(run_dir, entry("histogram", 7, **fields))])
    accumulator = read(run_dir / "tensorboard")
    [event] = accumulator.Histograms("weights/layer1")
    value = event.histogram_value
    assert event.step == 7
    assert list(value.bucket_limit) == [-0.5, 0.0, 0.5, 1.0]
    assert list(value.bucket) == [1.0, 0.0, 7.0, 2.0]
    assert (value.min, value.max, value.num, value.sum, value.sum_squares) == (
        -0.9,
        0.75,
        10,
        1.125,
        2.5,
    )


def test_agent_histograms_reach_the_histogram_dashboard_intact(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """A histogram made by agent/histograms.py migrates to dashboard buckets holding every count."""
    sample = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    fields = histograms.from_tensor({"name": "grads", "dtype": "float32"}, sample.tobytes(), 32)
    sink = make_sink()
    sink.export([batch(run_dir, entry("histogram", 3, **fields))])
    accumulator = read(run_dir / "tensorboard")
    [event] = accumulator.Histograms("grads")
    assert list(event.histogram_value.bucket_limit) == fields["edges"][1:]
    assert list(event.histogram_value.bucket) == fields["counts"]
    assert event.histogram_value.num == 5000
    [raw] = [v for e in accumulator.Tensors("grads")] if False else [None]
    migrated = data_compat.migrate_value(_first_value(run_dir / "tensorboard", "grads"))
    assert migrated.metadata.plugin_data.plugin_name == "histograms"
    buckets = np.frombuffer(migrated.tensor.tensor_content, dtype=np.float32).reshape(-1, 3)
    assert buckets[:, 2].sum() == 5000
    assert buckets[0, 0] == np.float32(fields["min"]) and buckets[-1, 1] == np.float32(fields["max"])
