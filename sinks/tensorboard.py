"""TensorBoard event files, in TensorBoard's own record format, written on the sink's thread.

Each run gets ``<run dir>/tensorboard`` (or ``<logdir>/<run id>``), with one
``rank-N`` subdirectory per rank when the job has several (``per_rank``).
Scalars, histograms, text, images, events, the run's config and alerts become
the summaries TensorBoard's dashboards read; other kinds are not TensorBoard's
business and are ignored.

A bad entry (a missing field, a histogram whose edges and counts disagree, an
image that is not there) is skipped and counted in ``skipped`` /
``skip_reasons``; the rest of the batch is written. Only a failure to write
raises, so the worker retries it; the writer that failed is dropped first, so
the retry starts a fresh event file.

TensorFlow is never imported: its import costs seconds and gigabytes in the
agent. See docs/tensorboard.md for the layout and the options.
"""

from __future__ import annotations

import collections
import functools
import itertools
import json
import logging
import math
import operator
import re
import struct
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic

# TensorBoard ships no type stubs and no py.typed marker: its objects are Any here.
from tensorboard.compat.proto import (  # type: ignore[import-untyped]
    event_pb2,
    histogram_pb2,
    summary_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from tensorboard.plugins.text import plugin_data_pb2  # type: ignore[import-untyped]

from probe import protocol
from sinks import schema
from sinks.base import Batch, Sink, plain_numbers
from sinks.ratelimit import RateLimitedLog
from sinks.registry import SinkContext
from sinks.tensorboard_file import EventFile

logger = logging.getLogger("outrider.sinks.tensorboard")

#: run ids name directories; anything else is refused (the agent checks the same pattern)
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: a bigger image is skipped rather than copied into every event file reader's memory
MAX_IMAGE_BYTES = 32 * 1024 * 1024
SKIP_WARNING_INTERVAL = 60.0

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: PNG colour type -> TensorBoard colorspace (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA)
PNG_COLORSPACE = {0: 1, 4: 2, 2: 3, 3: 3, 6: 4}


def _use_tensorflow_stub() -> None:
    """Make TensorBoard use its bundled TensorFlow stub even where TensorFlow is installed.

    TensorBoard's modules reach files through ``tensorboard.compat.tf``, which
    imports the real TensorFlow when it can unless ``tensorboard.compat.notf``
    exists: that empty module is TensorBoard's own switch (its
    ``no_tensorflow`` build target), which the pip wheel does not ship.
    """
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


_use_tensorflow_stub()


def _use_c_crc32c() -> None:
    """Frame event records with google-crc32c's C CRC-32C instead of the stub's Python one.

    Without TensorFlow, TensorBoard's record writer computes each record's two
    checksums byte by byte in Python (~100 us per KB, in the agent, on cores
    the trainer uses); the C library gives the same values in well under a
    microsecond. The writer takes the function from its module's globals.
    """
    try:
        import google_crc32c
        from tensorboard.summary.writer import record_writer  # type: ignore[import-untyped]
    except ImportError:
        return

    def masked_crc32c(data: bytes) -> int:
        crc: int = google_crc32c.value(data)
        return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    record_writer.masked_crc32c = masked_crc32c


_use_c_crc32c()


class BadEntry(ValueError):
    """An entry that cannot become a summary; ``reason`` is the counter it is skipped under."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass
class _RankLog:
    """One event file writer and the state kept beside it, per (run, rank directory)."""

    run: str
    directory: Path
    writer: EventFile
    next_step: int = 0  # steps for entries that have none
    config_text: bytes | None = None  # the last config written, so an unchanged one is not repeated


class TensorBoardSink(Sink):
    """Writes accepted records as TensorBoard summaries, one event file per run and rank."""

    name = "tensorboard"

    class Options(pydantic.BaseModel):
        """The keys under ``sinks: tensorboard:`` in the agent's config."""

        model_config = pydantic.ConfigDict(extra="forbid")

        logdir: Path | None = pydantic.Field(
            default=None,
            description="Root for event files: run R writes to `<logdir>/R`. "
            "Default (null): `<run dir>/tensorboard`, next to the run's metrics.jsonl.",
        )
        per_rank: Literal["auto", "always", "rank0"] = pydantic.Field(
            default="auto",
            description="`auto`: a `rank-N` subdirectory per rank only when world_size > 1; "
            "`always`: a `rank-N` subdirectory even for one rank; "
            "`rank0`: only rank 0's records (and the agent's or job's own, rank -1), in the "
            "run's directory.",
        )
        flush_secs: float = pydantic.Field(
            default=2.0,
            gt=0,
            description="Most seconds a written event waits before it is flushed to its file "
            "(every export flushes the files it wrote to, on the agent's once-a-second beat).",
        )
        max_text_chars: int = pydantic.Field(
            default=65_536,
            gt=0,
            description="Longer text, event attributes, configs and alert messages are "
            "truncated to this many characters, with a note saying so.",
        )

    def __init__(
        self,
        options: TensorBoardSink.Options | None = None,
        context: SinkContext | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.options = options or self.Options()
        self.context = context
        self.clock = clock
        self.skipped = 0
        self.skip_reasons: collections.Counter[str] = collections.Counter()
        self._logs: dict[Path, _RankLog] = {}
        self._complaints = RateLimitedLog(SKIP_WARNING_INTERVAL, log=logger)
        self._closed = False
        # Each adds its entry's values to the event's summary (built in place: a value made
        # on its own is copied on the way in, which took half of a scalars entry's time).
        self._summaries: dict[str, Callable[[dict[str, Any], Path, Any], None]] = {
            protocol.SCALARS: self._scalars,
            schema.HISTOGRAM: self._histogram,
            protocol.TEXT: self._text,
            schema.IMAGE: self._image,
            protocol.EVENT: self._event,
            protocol.CONFIG: self._config,
            schema.ALERT: self._alert,
            schema.SYSTEM: self._system,
        }

    # -- the Sink contract ------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Skipped entries, by reason (shown in the agent's sink health)."""
        return {f"skipped_{reason}": count for reason, count in self.skip_reasons.items()}

    def export(self, batches: Sequence[Batch]) -> None:
        """Write ``batches``, then flush the files they touched.

        Events are in their files once this returns, and a write error
        surfaces here, where the worker retries it.
        """
        if self._closed:
            raise RuntimeError("the tensorboard sink is closed")
        touched: dict[Path, _RankLog] = {}
        for batch in batches:
            self._export_batch(batch, touched)
        for directory, log in touched.items():
            if self._logs.get(directory) is log:  # not closed by a run_end meanwhile
                self._guarded(log, log.writer.flush)

    def flush(self, timeout: float) -> None:
        for log in list(self._logs.values()):
            self._guarded(log, log.writer.flush)

    def close(self, timeout: float) -> None:
        self._closed = True
        errors = []
        for directory in list(self._logs):
            try:
                self._close_log(directory)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    # -- where things go ----------------------------------------------------------
    def directory(self, batch: Batch) -> Path | None:
        """The directory ``batch`` is written to; None when ``per_rank`` leaves it out."""
        source = batch.source
        mode = self.options.per_rank
        if mode == "rank0" and source.rank > 0:
            return None
        if self.options.logdir is not None:
            base = self.options.logdir.expanduser() / source.run
        else:
            base = Path(batch.run_dir) / "tensorboard"
        per_rank = mode == "always" or (mode == "auto" and source.world_size > 1)
        if per_rank and source.rank >= 0:
            return base / f"rank-{source.rank}"
        return base  # one rank, or the agent's and the job's own entries (rank -1)

    def _export_batch(self, batch: Batch, touched: dict[Path, _RankLog]) -> None:
        if not (isinstance(batch.source.run, str) and RUN_ID.fullmatch(batch.source.run)):
            for _ in batch.entries:
                self._skip("bad_run_id", f"run id {batch.source.run!r} cannot name a directory")
            return
        directory = self.directory(batch)
        if directory is None:  # per_rank: rank0 leaves this rank out; `outrider run` has rank -1
            if any(
                isinstance(e, dict) and e.get("kind") == protocol.RUN_END for e in batch.entries
            ):
                self._close_run(batch.source.run)
            return
        run_dir = Path(batch.run_dir)
        for entry in batch.entries:
            kind = entry.get("kind") if isinstance(entry, dict) else None
            if kind == protocol.RUN_END:
                self._close_run(batch.source.run)
                continue
            summarize = self._summaries.get(kind) if isinstance(kind, str) else None
            if summarize is None:
                continue  # hello, heartbeat, probe_stats, bye, tensor, and kinds to come
            event = event_pb2.Event()
            try:
                step = _step(entry.get("step"))
                summarize(entry, run_dir, event.summary)
            except BadEntry as exc:
                self._skip(exc.reason, str(exc))
                continue
            except Exception as exc:  # a shape no check foresaw; still only this entry's problem
                self._skip(f"bad_{kind}", f"{type(exc).__name__}: {exc}")
                continue
            if not event.summary.value:
                continue
            log = self._log(batch.source.run, directory)
            if kind == protocol.CONFIG:
                text = event.summary.value[0].tensor.string_val[0]
                if text == log.config_text:
                    continue
            if step is None:
                step = log.next_step
                log.next_step += 1
            event.wall_time = _wall_time(entry.get("t"), self.clock)
            event.step = step
            self._guarded(log, functools.partial(log.writer.add_event, event))
            touched[directory] = log
            if kind == protocol.CONFIG:
                log.config_text = text

    def _log(self, run: str, directory: Path) -> _RankLog:
        log = self._logs.get(directory)
        if log is None:
            log = self._logs[directory] = _RankLog(run, directory, EventFile(directory))
        return log

    def _guarded(self, log: _RankLog, write: Callable[[], Any]) -> None:
        """Run a writer call; a writer that failed is dropped, so a retry opens a fresh file."""
        try:
            write()
        except Exception:
            self._logs.pop(log.directory, None)
            try:
                log.writer.close()
            except Exception as exc:
                logger.debug("closing a failed writer for %s: %s", log.directory, exc)
            raise

    def _close_run(self, run: str) -> None:
        """The run has ended: close its files rather than hold them open forever."""
        for directory in [d for d, log in self._logs.items() if log.run == run]:
            self._close_log(directory)

    def _close_log(self, directory: Path) -> None:
        log = self._logs.pop(directory)
        log.writer.close()

    def _skip(self, reason: str, detail: str) -> None:
        self.skipped += 1
        self.skip_reasons[reason] += 1
        self._complaints.warning(
            reason,
            "outrider sink tensorboard: skipped an entry (%s: %s); %d skipped for this reason",
            reason,
            detail,
            self.skip_reasons[reason],
        )

    # -- one summary builder per kind: entry -> values added to ``summary``, or BadEntry --
    def _scalars(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        metrics = _field(entry, "metrics", dict, protocol.SCALARS)
        add = summary.value.add
        # The common case, checked in C: plain numbers under non-empty names.
        if plain_numbers(metrics.values()) and all(metrics):
            try:
                for tag, value in metrics.items():
                    add(tag=tag, simple_value=value)
                return
            except (TypeError, ValueError, OverflowError):
                del summary.value[:]  # a name that is not a string, an int beyond any float
        for tag, raw in metrics.items():
            value = _number(raw)
            if not isinstance(tag, str) or not tag or value is None:
                self._skip("bad_scalar_value", f"metric {tag!r}: {raw!r} is not a number")
                continue
            add(tag=tag, simple_value=value)

    def _histogram(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        tag = _name(entry, schema.HISTOGRAM)
        edges = _numbers(entry, "edges", tag)
        counts = _numbers(entry, "counts", tag)
        if not counts or len(edges) != len(counts) + 1:
            raise BadEntry(
                "bad_histogram",
                f"histogram {tag!r}: {len(edges)} edges for {len(counts)} counts "
                "(want one more edge than counts, and at least one count)",
            )
        # Sorted with finite ends: finite throughout (a NaN fails the comparison).
        if not (
            math.isfinite(edges[0])
            and math.isfinite(edges[-1])
            and all(map(operator.le, edges, itertools.islice(edges, 1, None)))
        ):
            raise BadEntry("bad_histogram", f"histogram {tag!r}: edges must be finite and sorted")
        if not all(map(operator.le, itertools.repeat(0.0), counts)):  # NaN fails this too
            raise BadEntry("bad_histogram", f"histogram {tag!r}: counts must be >= 0")

        def from_buckets(power: int) -> float:  # only for a statistic the entry lacks
            middles = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
            if power == 1:
                return sum(c * m for c, m in zip(counts, middles, strict=True))
            return sum(c * m * m for c, m in zip(counts, middles, strict=True))

        histogram = histogram_pb2.HistogramProto(
            min=_stat(entry, "min", lambda: edges[0]),
            max=_stat(entry, "max", lambda: edges[-1]),
            num=_stat(entry, "count", lambda: sum(counts)),
            sum=_stat(entry, "sum", lambda: from_buckets(1)),
            sum_squares=_stat(entry, "sum_squares", lambda: from_buckets(2)),
            # TensorBoard's bucket i is (limit[i-1], limit[i]]: right edges only, `min` standing
            # in for the first left edge; its histogram and distribution dashboards draw that.
            bucket_limit=edges[1:],
            bucket=counts,
        )
        summary.value.add(tag=tag, histo=histogram)

    def _text(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        tag = _name(entry, protocol.TEXT)
        text = _field(entry, "text", str, protocol.TEXT)
        self._markdown(summary, tag, *self._truncate(text, code_block))

    def _image(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        tag = _name(entry, schema.IMAGE)
        path = Path(_field(entry, "path", str, schema.IMAGE))
        if not path.is_absolute():
            path = run_dir / path
        try:
            size = path.stat().st_size
            if size > MAX_IMAGE_BYTES:
                raise BadEntry("bad_image", f"image {tag!r}: {path} is {size} bytes")
            data = path.read_bytes()
        except OSError as exc:
            raise BadEntry("bad_image", f"image {tag!r}: cannot read {path}: {exc}") from None
        width, height, colorspace = png_header(data)
        image = summary_pb2.Summary.Image(
            height=height, width=width, colorspace=colorspace, encoded_image_string=data
        )
        summary.value.add(tag=tag, image=image)

    def _event(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        tag = _name(entry, protocol.EVENT)
        attrs = entry.get("attrs", {})
        if not isinstance(attrs, dict):
            raise BadEntry(
                "bad_event", f"event {tag!r}: attrs is {type(attrs).__name__}, not a map"
            )
        body, note = self._truncate(_json(attrs), code_block, "json")
        self._markdown(summary, f"events/{tag}", body, note)

    def _config(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        params = _field(entry, "params", dict, protocol.CONFIG)
        self._markdown(summary, "config", *self._truncate(_json(params), code_block, "json"))

    def _alert(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        tag = _name(entry, schema.ALERT)
        severity = _field(entry, "severity", str, schema.ALERT)
        message = _field(entry, "message", str, schema.ALERT)
        body, note = self._truncate(message, escape_markdown)
        headline = f"**{escape_markdown(severity.upper())}** {body}"
        self._markdown(summary, f"alerts/{tag}", headline, note)

    def _system(self, entry: dict[str, Any], run_dir: Path, summary: Any) -> None:
        """A host sample: one scalar per ``sinks.schema.flatten`` name (``system/...``).

        The agent's own entries (rank -1) go where its alerts go: the run's
        directory, so TensorBoard shows a ``system`` section beside the
        training scalars (see docs/system.md).
        """
        add = summary.value.add
        for tag, value in schema.flatten(entry).items():
            add(tag=tag, simple_value=value)

    def _truncate(self, text: str, render: Callable[..., str], *args: str) -> tuple[str, str]:
        """``render(text)``, cut to ``max_text_chars`` first; the note says what was cut."""
        limit = self.options.max_text_chars
        if len(text) <= limit:
            return render(text, *args), ""
        return render(text[:limit], *args), f"*(truncated: {limit} of {len(text)} characters)*"

    @staticmethod
    def _markdown(summary: Any, tag: str, body: str, note: str = "") -> None:
        """A text-plugin value: one UTF-8 string, rendered as Markdown by TensorBoard."""
        text = f"{body}\n\n{note}" if note else body
        metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name="text",
                content=plugin_data_pb2.TextPluginData(version=0).SerializeToString(),
            )
        )
        tensor = tensor_pb2.TensorProto(
            dtype=types_pb2.DT_STRING,
            tensor_shape=tensor_shape_pb2.TensorShapeProto(),  # a scalar: rendered as-is, no table
            string_val=[text.encode("utf-8", "replace")],
        )
        summary.value.add(tag=tag, metadata=metadata, tensor=tensor)


# -- pure helpers -------------------------------------------------------------------------


def png_header(data: bytes) -> tuple[int, int, int]:
    """``(width, height, colorspace)`` from a PNG's IHDR chunk; BadEntry if it is not a PNG."""
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise BadEntry("bad_image", "not a PNG file")
    width, height, _bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    colorspace = PNG_COLORSPACE.get(color_type)
    if width == 0 or height == 0 or colorspace is None:
        raise BadEntry("bad_image", f"bad PNG header: {width}x{height}, colour type {color_type}")
    return width, height, colorspace


def code_block(text: str, language: str = "") -> str:
    """``text`` in a fenced code block whose fence no backtick run inside it can close."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|>])")


def escape_markdown(text: str) -> str:
    """``text`` shown literally by TensorBoard's Markdown (Python-Markdown + tables)."""
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text)


def _json(value: Any) -> str:
    try:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)
    except (TypeError, ValueError) as exc:
        raise BadEntry("bad_json", f"cannot show as JSON: {exc}") from None


def _field(entry: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = entry.get(key)
    if not isinstance(value, kind):
        problem = "missing" if value is None else f"a {type(value).__name__}, not {kind.__name__}"
        raise BadEntry(f"bad_{what}", f"{what} entry: {key!r} is {problem}")
    return value


def _numbers(entry: dict[str, Any], key: str, tag: str) -> list[float]:
    raw = _field(entry, key, list, schema.HISTOGRAM)
    if plain_numbers(raw):
        return raw  # type: ignore[no-any-return]
    numbers = [_number(x) for x in raw]
    if any(x is None for x in numbers):
        raise BadEntry("bad_histogram", f"histogram {tag!r}: {key} holds a non-number")
    return numbers  # type: ignore[return-value]  # None ruled out just above


def _name(entry: dict[str, Any], what: str) -> str:
    name: str = _field(entry, "name", str, what)
    if not name:
        raise BadEntry(f"bad_{what}", f"{what} entry: empty name")
    return name


def _number(value: Any) -> float | None:
    """A float from a JSON number or a non-finite spelling; None for anything else."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, int | float):
        try:
            return float(value)
        except OverflowError:  # an int beyond any float
            return None
    if isinstance(value, str):
        return schema.decode_number(value)
    return None


def _stat(entry: dict[str, Any], key: str, default: Callable[[], float]) -> float:
    """A histogram statistic, or ``default()`` (derived from the buckets) when absent."""
    if key not in entry:
        return default()
    value = _number(entry[key])
    if value is None:
        raise BadEntry("bad_histogram", f"histogram {key} is {entry[key]!r}, not a number")
    return value


def _step(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not -(2**63) <= value < 2**63:
        raise BadEntry("bad_step", f"step {value!r} is not an integer")
    return value


def _wall_time(value: Any, clock: Callable[[], float]) -> float:
    number = _number(value)
    if number is None or not math.isfinite(number):
        return clock()
    return number
