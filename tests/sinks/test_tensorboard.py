"""The TensorBoard sink, read back with TensorBoard's own event reader."""

from __future__ import annotations

import html
import json
import math
import os
import struct
import subprocess
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tensorboard.backend.event_processing import (
    event_accumulator,
    event_multiplexer,
    plugin_event_accumulator,
)
from tensorboard.plugins.text import text_plugin
from tensorboard.util import tensor_util

from agent.store import histograms
from probe import protocol
from sinks import registry, schema
from sinks.base import Batch, Source
from sinks.health import Health
from sinks.tensorboard import TensorBoardSink
from sinks.worker import SinkWorker
from tests.helpers import PYTHON, REPO, wait_for

EVERYTHING = dict.fromkeys(event_accumulator.DEFAULT_SIZE_GUIDANCE, 0)  # 0: keep every event


def f32(value: float) -> float:
    """``value`` as TensorBoard stores a scalar (float32)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def pixels(width: int, height: int, channels: int, seed: int) -> bytes:
    """Deterministic 8-bit pixel data, row after row."""
    return bytes(
        (seed + x * 31 + y * 17 + c * 7) % 256
        for y in range(height)
        for x in range(width)
        for c in range(channels)
    )


def png(width: int, height: int, channels: int, seed: int) -> bytes:
    """A valid 8-bit RGB (3) or RGBA (4) PNG of ``pixels``, built without an imaging library."""
    data = pixels(width, height, channels, seed)
    stride = width * channels
    rows = b"".join(b"\x00" + data[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 8, {3: 2, 4: 6}[channels], 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """``(width, height, pixels)`` of a PNG whose rows all use filter 0 (as ``png`` writes)."""
    offset, idat, width, height, channels = 8, b"", 0, 0, 0
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        if kind == b"IHDR":
            width, height, _, color_type = struct.unpack(">IIBB", body[:10])
            channels = {2: 3, 6: 4}[color_type]
        elif kind == b"IDAT":
            idat += body
        offset += 12 + length
    raw, stride = zlib.decompress(idat), width * channels + 1
    rows = [raw[y * stride : (y + 1) * stride] for y in range(height)]
    assert all(row[0] == 0 for row in rows)
    return width, height, b"".join(row[1:] for row in rows)


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


def entry(kind: str, step: Any = None, t: float = 1_700_000_000.5, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "step": step, "rank": 0, "t": t, "stream": "s", "seq": 0, **fields}


def batch(run_dir: Path, *entries: dict[str, Any], **where: Any) -> Batch:
    return Batch(source=source(**where), entries=list(entries), run_dir=str(run_dir))


def read(directory: Path) -> event_accumulator.EventAccumulator:
    """Everything TensorBoard's reader finds in ``directory`` (not its subdirectories)."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance=EVERYTHING)
    accumulator.Reload()
    return accumulator


def read_as_dashboards(directory: Path) -> plugin_event_accumulator.EventAccumulator:
    """``directory`` as TensorBoard's dashboards load it: old-style summaries become tensors."""
    accumulator = plugin_event_accumulator.EventAccumulator(
        str(directory), size_guidance=plugin_event_accumulator.STORE_EVERYTHING_SIZE_GUIDANCE
    )
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


def open_event_files() -> int:
    """Event files this process holds open (the sink's writers)."""
    import psutil

    return sum("tfevents" in f.path for f in psutil.Process().open_files())


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


#: a derived statistic's non-finite values, as earlier agents stored them (Python's ``str``)
#: and as the run store spells them now
PYTHON_SPELLING = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
CANONICAL_SPELLING = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def derived(run_dir: Path, step: int, metrics: dict[str, Any]) -> Batch:
    """Derived statistics as the agent stores and sends them: its own stream, rank 0's values."""
    agent = Source("run-1", schema.AGENT_STREAM, 0, -1, 0, "host", 1)
    stored = entry(protocol.SCALARS, step, t=1000.0 + step, metrics=metrics)
    return Batch(agent, [{**stored, "stream": schema.AGENT_STREAM, "seq": -1}], str(run_dir))


@pytest.mark.parametrize("spelling", [PYTHON_SPELLING, CANONICAL_SPELLING], ids=["python", "json"])
def test_non_finite_derived_statistics_reach_tensorboard_in_either_spelling(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path, spelling: dict[str, float]
) -> None:
    """A derived statistic stored as "nan"/"inf"/"-inf" or "NaN"/"Infinity"/"-Infinity" is
    written as that float, not skipped."""
    tags = {f"features/h/stat_{i}": text for i, text in enumerate(spelling)}
    worker = SinkWorker(make_sink(), flush_interval=0.1)
    try:
        worker.submit(derived(run_dir, 10, {"features/h/rank": 3.0, **tags}))
        # One entry is one event: its values arrive together or not at all.
        accumulator = read_when(run_dir / "tensorboard", has_scalars("features/h/rank"))
    finally:
        assert worker.close(10.0)
    assert set(tags) <= set(accumulator.Tags()["scalars"])
    for tag, text in tags.items():
        [event] = accumulator.Scalars(tag)
        expected = spelling[text]
        assert event.step == 10
        assert math.isnan(event.value) if math.isnan(expected) else event.value == expected
    assert worker.sink.skipped == 0  # type: ignore[attr-defined]


def test_entries_without_a_step_take_consecutive_steps_per_run(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Step-less entries get 0, 1, 2, ... from one counter per run directory."""
    sink = make_sink()
    sink.export(
        [batch(run_dir, *(entry("scalars", None, metrics={"x": float(i)}) for i in range(3)))]
    )
    sink.export([batch(run_dir, entry("scalars", None, metrics={"x": 3.0}))])
    scalars = read(run_dir / "tensorboard").Scalars("x")
    assert [(e.step, e.value) for e in scalars] == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0)]


def test_histogram_keeps_bucket_limits_counts_and_statistics(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """edges/counts become TensorBoard's right-edge buckets; min/max/sum/count are kept exactly."""
    sink = make_sink()
    fields: dict[str, Any] = {
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
    """A histogram made by agent.store.histograms migrates to buckets holding every count."""
    sample = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    fields = histograms.from_tensor({"name": "grads", "dtype": "float32"}, sample.tobytes(), 32)
    sink = make_sink()
    sink.export([batch(run_dir, entry("histogram", 3, **fields))])
    accumulator = read(run_dir / "tensorboard")
    [event] = accumulator.Histograms("grads")
    assert list(event.histogram_value.bucket_limit) == fields["edges"][1:]
    assert list(event.histogram_value.bucket) == fields["counts"]
    assert event.histogram_value.num == 5000
    dashboard = read_as_dashboards(run_dir / "tensorboard")
    assert "grads" in dashboard.PluginTagToContent("histograms")
    [migrated] = dashboard.Tensors("grads")
    buckets = tensor_util.make_ndarray(migrated.tensor_proto)  # rows of (left, right, count)
    assert buckets[:, 2].sum() == 5000
    assert buckets[0, 0] == np.float32(fields["min"])
    assert buckets[-1, 1] == np.float32(fields["max"])


def test_text_is_a_code_block_on_the_text_dashboard(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Text (code with backticks, fences and HTML) renders verbatim inside one <pre><code> block."""
    sample = "def f(x):\n    return `x` * 2  # <b>not bold</b> **nor this**\n```\nfence\n```"
    sink = make_sink()
    sink.export([batch(run_dir, entry("text", 5, name="samples/code", text=sample))])
    accumulator = read(run_dir / "tensorboard")
    assert accumulator.SummaryMetadata("samples/code").plugin_data.plugin_name == "text"
    [event] = accumulator.Tensors("samples/code")
    assert event.step == 5
    page = rendered(event.tensor_proto.string_val[0].decode())
    assert page.startswith("<pre><code>") and page.count("<pre>") == 1
    assert html.escape(sample, quote=False) in page
    assert "samples/code" in read_as_dashboards(run_dir / "tensorboard").PluginTagToContent("text")


def test_long_text_is_truncated_with_a_note(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Text over max_text_chars keeps its first max_text_chars characters and says it was cut."""
    sink = make_sink(max_text_chars=10)
    sink.export([batch(run_dir, entry("text", 0, name="long", text="abcdefghij" + "x" * 15))])
    [stored] = text_of(read(run_dir / "tensorboard"), "long")
    assert "abcdefghij" in stored and "abcdefghijx" not in stored
    assert "truncated: 10 of 25 characters" in stored


def test_images_relative_and_absolute_round_trip_byte_for_byte(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path, tmp_path: Path
) -> None:
    """PNG files (relative to the run dir, or absolute) are stored unchanged with their size."""
    (run_dir / "plots").mkdir()
    relative = png(3, 2, channels=3, seed=1)
    absolute = png(5, 4, channels=4, seed=2)
    (run_dir / "plots" / "rgb.png").write_bytes(relative)
    (tmp_path / "rgba.png").write_bytes(absolute)
    sink = make_sink()
    sink.export(
        [
            batch(
                run_dir,
                entry("image", 1, name="plots/rgb", path="plots/rgb.png"),
                entry("image", 2, name="plots/rgba", path=str(tmp_path / "rgba.png")),
            )
        ]
    )
    accumulator = read(run_dir / "tensorboard")
    [rgb] = accumulator.Images("plots/rgb")
    [rgba] = accumulator.Images("plots/rgba")
    assert (rgb.step, rgb.width, rgb.height, rgb.encoded_image_string) == (1, 3, 2, relative)
    assert (rgba.step, rgba.width, rgba.height, rgba.encoded_image_string) == (2, 5, 4, absolute)
    assert decode_png(rgb.encoded_image_string) == (3, 2, pixels(3, 2, 3, seed=1))
    assert decode_png(rgba.encoded_image_string) == (5, 4, pixels(5, 4, 4, seed=2))


def test_events_and_alerts_become_text_under_their_prefixes(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Event attrs are JSON under events/<name>; an alert shows its severity and literal message."""
    attrs = {"path": "/ckpt/step-10.pt", "epoch": 3, "tags": ["best", "ema"]}
    message = "loss *spiked* at <step 10> & [see](http://x) _now_"
    sink = make_sink()
    sink.export(
        [
            batch(
                run_dir,
                entry("event", 10, name="checkpoint", attrs=attrs),
                entry("alert", 10, name="loss_spike", severity="warning", message=message),
            )
        ]
    )
    accumulator = read(run_dir / "tensorboard")
    [event_text] = text_of(accumulator, "events/checkpoint")
    body = event_text.split("\n", 1)[1].rsplit("\n", 1)[0]  # inside the ```json fence
    assert event_text.startswith("```json\n") and json.loads(body) == attrs
    [alert_text] = text_of(accumulator, "alerts/loss_spike")
    page = rendered(alert_text)
    assert "<strong>WARNING</strong>" in page
    assert html.escape(message, quote=False) in page
    assert "<em>" not in page and "<a " not in page


def test_config_is_written_once_and_again_when_it_changes(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """An unchanged config is not repeated; a changed one is written as a new config event."""
    sink = make_sink()
    sink.export(
        [
            batch(
                run_dir,
                entry("config", 0, params={"lr": 0.1, "model": {"layers": 4}}),
                entry("config", 5, params={"model": {"layers": 4}, "lr": 0.1}),
            )
        ]
    )
    sink.export([batch(run_dir, entry("config", 9, params={"lr": 0.2, "model": {"layers": 4}}))])
    events = read(run_dir / "tensorboard").Tensors("config")
    assert [e.step for e in events] == [0, 9]
    bodies = [e.tensor_proto.string_val[0].decode() for e in events]
    assert [json.loads(b.split("\n", 1)[1].rsplit("\n", 1)[0])["lr"] for b in bodies] == [0.1, 0.2]


def test_other_kinds_write_nothing(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """hello, heartbeat, probe_stats, bye, tensor and unknown kinds create no event file."""
    sink = make_sink()
    sink.export(
        [
            batch(
                run_dir,
                entry("hello", argv=["train.py"]),
                entry("heartbeat"),
                entry("probe_stats", produced=3),
                entry("bye", produced=3),
                entry("tensor", 1, name="w", dtype="float32", shape=[2], offset=0, nbytes=8),
                entry("from_the_future", 1, name="x"),
            )
        ]
    )
    sink.flush(5.0)
    assert not (run_dir / "tensorboard").exists()
    assert sink.skipped == 0


def test_world_size_two_gets_a_directory_per_rank(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """With per_rank=auto and two ranks, TensorBoard sees runs rank-0 and rank-1, each its own."""
    sink = make_sink()
    sink.export(
        [
            batch(run_dir, entry("scalars", 1, metrics={"loss": 1.0}), rank=0, world_size=2),
            batch(run_dir, entry("scalars", 1, metrics={"loss": 2.0}), rank=1, world_size=2),
        ]
    )
    multiplexer = event_multiplexer.EventMultiplexer(size_guidance=EVERYTHING)
    multiplexer.AddRunsFromDirectory(str(run_dir / "tensorboard"))
    multiplexer.Reload()
    assert set(multiplexer.Runs()) == {"rank-0", "rank-1"}
    assert [e.value for e in multiplexer.Scalars("rank-0", "loss")] == [1.0]
    assert [e.value for e in multiplexer.Scalars("rank-1", "loss")] == [2.0]


def test_one_rank_writes_the_run_directory_unless_always(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path, tmp_path: Path
) -> None:
    """per_rank=auto with world_size 1 writes <run>/tensorboard itself; always adds rank-0."""
    make_sink().export([batch(run_dir, entry("scalars", 0, metrics={"a": 1.0}))])
    assert read(run_dir / "tensorboard").Tags()["scalars"] == ["a"]
    assert not (run_dir / "tensorboard" / "rank-0").exists()
    other = tmp_path / "runs" / "run-2"
    make_sink(per_rank="always").export(
        [batch(other, entry("scalars", 0, metrics={"a": 1.0}), run="run-2")]
    )
    assert read(other / "tensorboard" / "rank-0").Tags()["scalars"] == ["a"]
    assert read(other / "tensorboard").Tags()["scalars"] == []


def test_rank0_mode_keeps_only_rank_zero(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """per_rank=rank0 writes rank 0 to the run directory and leaves other ranks out, uncounted."""
    sink = make_sink(per_rank="rank0")
    sink.export(
        [
            batch(run_dir, entry("scalars", 1, metrics={"loss": 1.0}), rank=0, world_size=2),
            batch(run_dir, entry("scalars", 1, metrics={"loss": 2.0}), rank=1, world_size=2),
        ]
    )
    assert [e.value for e in read(run_dir / "tensorboard").Scalars("loss")] == [1.0]
    assert sorted(p.name for p in (run_dir / "tensorboard").iterdir() if p.is_dir()) == []
    assert sink.skipped == 0


def test_logdir_option_puts_each_run_under_it(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path, tmp_path: Path
) -> None:
    """logdir=D writes run R to D/R and nothing into the run directory."""
    sink = make_sink(logdir=str(tmp_path / "tb"))
    sink.export([batch(run_dir, entry("scalars", 4, metrics={"loss": 0.5}))])
    assert [e.step for e in read(tmp_path / "tb" / "run-1").Scalars("loss")] == [4]
    assert not (run_dir / "tensorboard").exists()


def test_events_reach_the_file_within_flush_secs_without_a_flush_call(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Written events become readable within a few seconds with no explicit flush."""
    sink = make_sink(flush_secs=0.5)
    sink.export([batch(run_dir, entry("scalars", 0, metrics={"loss": 1.0}))])
    sink.export([batch(run_dir, entry("scalars", 1, metrics={"loss": 2.0}))])
    accumulator = read_when(run_dir / "tensorboard", has_scalars("loss", count=2), timeout=5.0)
    assert [e.value for e in accumulator.Scalars("loss")] == [1.0, 2.0]


def test_bad_entries_are_skipped_and_counted_while_the_rest_is_written(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """Malformed entries are counted in skipped by reason; good entries around them are kept."""
    (run_dir / "notes.txt").write_text("not a png")
    sink = make_sink()
    worker = SinkWorker(sink, flush_interval=0.1)
    bad = [
        entry("scalars", 0),
        entry("scalars", 0, metrics=[1.0]),
        entry("histogram", 0, name="h", edges=[0.0, 1.0, 2.0], counts=[1, 2, 3]),
        entry("histogram", 0, name="h", edges=[0.0, 1.0]),
        entry("histogram", 0, name="h", edges=[1.0, 0.0], counts=[1]),
        entry("histogram", 0, name="h", edges=[0.0, math.nan, 2.0], counts=[1, 1]),
        entry("histogram", 0, name="h", edges=[0.0, 1.0, 2.0], counts=[1.0, math.nan]),
        entry("histogram", 0, name="h", edges=[0.0, "Infinity"], counts=[1]),
        entry("image", 0, name="img", path="missing.png"),
        entry("image", 0, name="img", path="notes.txt"),
        entry("image", 0, name="img"),
        entry("text", 0, name="t"),
        entry("text", 0, text="no name"),
        entry("event", 0, name="e", attrs=["not", "a", "map"]),
        entry("alert", 0, name="a", message="no severity"),
        entry("scalars", "seven", metrics={"loss": 1.0}),
    ]
    good = [
        entry("scalars", 1, metrics={"loss": 1.0, "bad": "abc", "worse": [1], "ok": 2.0}),
        entry("text", 2, name="t", text="fine"),
        entry("histogram", 3, name="h", edges=[0.0, 1.0], counts=[4]),
        # plain numbers, the fast path, until a name or a value proves it wrong
        entry("scalars", 4, metrics={"fine": 3, "": 1.0}),
        entry("scalars", 5, metrics={"fine": 4.0, "huge": 10**400}),
        entry("scalars", 6, metrics={"fine": 5.0, 7: 1.0}),
    ]
    try:
        worker.submit(batch(run_dir, good[0], *bad[:7], good[1], *bad[7:], *good[2:]))
        accumulator = read_when(
            run_dir / "tensorboard",
            lambda a: (
                "h" in a.Tags()["histograms"]
                and "t" in a.Tags()["tensors"]
                and len(a.Scalars("fine")) == 3
                if "fine" in a.Tags()["scalars"]
                else False
            ),
        )
    finally:
        assert worker.close(10.0)
    assert sink.skipped == len(bad) + 5  # and the bad values inside the good scalars entries
    assert sink.skip_reasons == Counter(
        bad_scalars=2,
        bad_histogram=6,
        bad_image=3,
        bad_text=2,
        bad_event=1,
        bad_alert=1,
        bad_step=1,
        bad_scalar_value=5,
    )
    assert sorted(accumulator.Tags()["scalars"]) == ["fine", "loss", "ok"]
    assert [(e.step, e.value) for e in accumulator.Scalars("fine")] == [
        (4, 3.0),
        (5, 4.0),
        (6, 5.0),
    ]
    assert text_of(accumulator, "t") == ["```\nfine\n```"]
    assert [e.histogram_value.bucket[0] for e in accumulator.Histograms("h")] == [4.0]
    assert worker.stats.failures == 0 and worker.health == Health.CLOSED


def test_a_run_id_that_is_not_a_directory_name_writes_nothing(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path, tmp_path: Path
) -> None:
    """A run id like ../x is refused and counted, so no file lands outside logdir."""
    sink = make_sink(logdir=str(tmp_path / "tb" / "inner"))
    sink.export([batch(run_dir, entry("scalars", 0, metrics={"a": 1.0}), run="../escaped")])
    assert not (tmp_path / "tb").exists()
    assert sink.skip_reasons == Counter(bad_run_id=1)


def test_a_write_failure_raises_for_a_retry_and_the_sink_recovers(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """A logdir that cannot be made fails the export (not a skip); once fixed, writing resumes."""
    (run_dir / "tensorboard").write_text("a file where the directory should be")
    sink = make_sink()
    with pytest.raises(Exception, match="tensorboard"):
        sink.export([batch(run_dir, entry("scalars", 0, metrics={"a": 1.0}))])
    assert sink.skipped == 0
    (run_dir / "tensorboard").unlink()
    sink.export([batch(run_dir, entry("scalars", 1, metrics={"a": 2.0}))])
    assert [(e.step, e.value) for e in read(run_dir / "tensorboard").Scalars("a")] == [(1, 2.0)]


def test_run_end_and_close_release_every_writer(
    make_sink: Callable[..., TensorBoardSink], run_dir: Path
) -> None:
    """run_end closes that run's event files; later records still land; close() ends the rest."""
    before = open_event_files()
    sink = make_sink()
    sink.export([batch(run_dir, entry("scalars", 0, metrics={"a": 1.0}), rank=0, world_size=2)])
    sink.export([batch(run_dir, entry("scalars", 0, metrics={"a": 2.0}), rank=1, world_size=2)])
    assert open_event_files() == before + 2
    sink.export([batch(run_dir, entry("run_end", exit_status=0), rank=-1)])
    assert open_event_files() == before
    sink.export([batch(run_dir, entry("scalars", 1, metrics={"a": 3.0}), rank=0, world_size=2)])
    assert open_event_files() == before + 1
    assert [e.value for e in read(run_dir / "tensorboard" / "rank-0").Scalars("a")] == [1.0, 3.0]
    sink.close(5.0)
    assert open_event_files() == before
    with pytest.raises(RuntimeError, match="closed"):
        sink.export([batch(run_dir, entry("scalars", 2, metrics={"a": 4.0}))])


def test_options_are_checked_by_the_registry_and_build_the_sink(tmp_path: Path) -> None:
    """Unknown or invalid options are config errors naming the option; valid ones build the sink."""
    with pytest.raises(registry.SinkConfigError, match="colour"):
        registry.validate_options("tensorboard", {"colour": "blue"})
    with pytest.raises(registry.SinkConfigError, match="per_rank"):
        registry.validate_options("tensorboard", {"per_rank": "sometimes"})
    with pytest.raises(registry.SinkConfigError, match="flush_secs"):
        registry.validate_options("tensorboard", {"flush_secs": 0})
    sink = registry.create(
        "tensorboard",
        {"logdir": str(tmp_path), "per_rank": "rank0", "max_text_chars": 100},
        registry.SinkContext(runs_dir=tmp_path),
    )
    assert isinstance(sink, TensorBoardSink)
    assert sink.options.logdir == tmp_path and sink.options.per_rank == "rank0"
    sink.close(1.0)


def test_tensorflow_is_never_imported_even_when_installed(tmp_path: Path) -> None:
    """With a tensorflow package on sys.path, writing events still never imports it."""
    fake = tmp_path / "site" / "tensorflow"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('tensorflow was imported')\n")
    code = f"""
import sys
from pathlib import Path
from sinks.base import Batch, Source
from sinks.tensorboard import TensorBoardSink
sink = TensorBoardSink()
source = Source("run-1", "s", 0, 0, 1, "host", 1)
entries = [{{"kind": "scalars", "step": 0, "t": 1.0, "metrics": {{"a": 1.0}}}}]
sink.export([Batch(source, entries, {str(tmp_path / "run")!r})])
sink.close(5.0)
assert "tensorflow" not in sys.modules, "tensorflow imported"
print("ok")
"""
    environment = dict(os.environ, PYTHONPATH=f"{tmp_path / 'site'}{os.pathsep}{REPO}")
    result = subprocess.run(
        [PYTHON, "-c", code], env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_event_records_are_framed_with_the_c_crc32c_and_the_stub_agrees() -> None:
    """The sink swaps the writer's pure-Python CRC-32C for google-crc32c's C one: the values
    must be exactly what TensorBoard's own (Python) reader checks them against."""
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer

    import sinks.tensorboard  # noqa: F401  - the import installs the C checksum

    assert record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c
    rng = np.random.default_rng(0)
    for size in (0, 1, 7, 8, 255, 4096):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert record_writer.masked_crc32c(data) == pywrap_tensorflow.masked_crc32c(data)
