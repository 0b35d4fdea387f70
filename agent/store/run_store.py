"""The run store: ``<runs dir>/<run id>/`` with run.json, metrics.jsonl, tensors.bin.

It is the source of truth and is written before anything else sees a
record. Lines are appended with one write per receive cycle, so what the
agent has accepted is in the kernel's hands within milliseconds (it survives
the agent being SIGKILLed) and on disk within the OS's writeback.

A disk that fills up, turns read-only or loses the run directory never ends
the agent and never leaves half a line: what a cycle could not write is cut
back to its last whole message, its records are counted per stream as not
stored (``store_full``, ``store_error``), and the next cycle tries again, so
writing resumes by itself when space comes back. run.json, with the exact
accounting, is written through space reserved ahead (``agent.store.disk``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from agent.ingest.accounting import StreamLedger
from agent.ingest.decode import Record, ScalarRows
from agent.store import histograms, runinfo
from agent.store.disk import (
    RESERVE_BYTES,
    STORE_ERROR,
    AppendFile,
    ReservedJson,
    describe,
    reason_for,
)
from agent.store.layout import ALERTS, METRICS, RUN_JSON, TENSORS
from probe import protocol
from sinks import schema

_INFO_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outrider-runinfo")
_JSON = orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS

logger = logging.getLogger("outrider.agent")

#: the alert rule event a run store raises when it cannot write (agent/alerts/defaults.yaml)
STORE_FAILED = "store_failed"


class _Chunk(NamedTuple):
    """What one pending chunk of lines holds, to count it if the disk refuses it."""

    ledger: StreamLedger | None  # None: the agent's own line
    records: int
    tensor_end: int  # tensors.bin's size once this chunk's tensor bytes are in
    announces: str | None  # the stream whose ``source`` this chunk carries


def _unknown(entry: dict[str, Any]) -> dict[str, Any]:
    """A stream whose first line (with its source) was lost: what the line itself says."""
    rank = entry.get("rank", -1)
    return {
        "stream": entry["stream"],
        "rank": rank,
        "local_rank": -1,
        "world_size": 0,
        "host": "?",
        "pid": -1,
    }


class RunStore:
    """One run's directory: appends records, keeps run.json and the stream ledgers."""

    def __init__(
        self,
        runs_dir: Path,
        run_id: str,
        meta: dict[str, Any] | None = None,
        histogram_bins: int = 64,
    ) -> None:
        self.histogram_bins = histogram_bins
        self.dir = runs_dir / run_id
        self.run_id = run_id
        self.streams: dict[str, StreamLedger] = {}
        self.info: dict[str, Any] = {"run_id": run_id}
        self._run_json = ReservedJson(self.dir / RUN_JSON)
        self._metrics: AppendFile | None = None
        self._tensors: AppendFile | None = None
        self._alerts: AppendFile | None = None
        self._pending: list[bytes] = []
        self._chunks: list[_Chunk] = []
        self._tensor_parts: list[bytes] = []
        self._tensor_offset = 0
        self._alert_lines: list[tuple[int, bytes]] = []  # (chunk index, line) for alerts.jsonl
        self._announced: set[str] = set()  # streams whose ``source`` this metrics.jsonl holds
        self._info_jobs: list[concurrent.futures.Future[dict[str, Any]]] = []
        #: why the store cannot write now (None: it can); the reason its losses count under
        self.failure: str | None = None
        self._reason = ""
        self.failures = 0  # episodes of failing
        self._failed_since_beat = False
        self._last_write_ok = True
        self.agent_lines_not_stored: dict[str, int] = {}
        self.alarms: list[dict[str, Any]] = []  # store_failed alerts for the receive loop
        self.dirty = True
        self.last_record_time = 0.0
        self.records = 0
        #: run.json's keys someone else keeps (the job aggregator's view), merged at each write
        self.view: Callable[[], dict[str, Any]] | None = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            existing = self.dir / RUN_JSON
            if existing.exists():
                self._resume(existing)
        except OSError as error:
            self._failed(error, "cannot open the run directory")
        self.info.setdefault("start_time", time.time())
        self.info.setdefault("status", "running")
        self.info.setdefault("config", {})
        if meta:
            self.info.update(meta)
        if self.failure is None:
            self._open_files()
        if self.failure is None:
            self._run_json.reserve(RESERVE_BYTES)

    def _open_files(self) -> bool:
        """Open (or make again) the run directory's append-only files."""
        self._close_files()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._metrics = AppendFile(self.dir / METRICS)
            self._tensors = AppendFile(self.dir / TENSORS)
        except OSError as error:
            self._close_files()
            self._failed(error, "cannot open the run directory")
            return False
        self._tensor_offset = self._tensors.size
        self._announced.clear()
        return True

    def _close_files(self) -> None:
        for file in (self._metrics, self._tensors, self._alerts):
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()
        self._metrics = self._tensors = self._alerts = None

    def _resume(self, run_json: Path) -> None:
        """A restarted agent picks up the run: its info and every stream's accounting."""
        try:
            self.info = orjson.loads(run_json.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            self.info = {"run_id": self.run_id}
        self.info["status"] = "running"
        self.info.pop("end_time", None)
        metrics = self.dir / METRICS
        if metrics.exists():
            self._replay(metrics)
        self._restore_counts(self.info.get("streams"))

    def _replay(self, metrics: Path) -> None:
        """The ledgers of the records metrics.jsonl holds."""
        previous: tuple[Any, Any] | None = None
        with open(metrics, "rb") as lines:
            for line in lines:
                try:
                    entry = orjson.loads(line)
                except orjson.JSONDecodeError:
                    continue  # a line cut short by a crash
                if (
                    not isinstance(entry, dict)
                    or not {"stream", "kind", "seq", "t"} <= entry.keys()
                    or entry["stream"] == schema.AGENT_STREAM  # the agent's own entries
                ):
                    continue
                record = (entry["stream"], entry["seq"])
                if record == previous:
                    continue  # another line of the same record (a histogram batch)
                previous = record
                ledger = self.streams.get(entry["stream"])
                if ledger is None:
                    ledger = StreamLedger.from_envelope(entry.get("source") or _unknown(entry))
                    self.streams[ledger.stream] = ledger
                ledger.observe(entry["kind"], entry["seq"], entry["t"], entry.get("step"), entry)

    def _restore_counts(self, summaries: Any) -> None:
        """What the previous agent counted but could not store (the disk was full) is in
        its run.json, not in metrics.jsonl: add it back so the identity still holds."""
        if not isinstance(summaries, list):
            return
        for summary in summaries:
            try:
                ledger = self.streams.get(summary["stream"])
                if ledger is None:
                    if not summary.get("not_stored"):
                        continue
                    ledger = StreamLedger.from_envelope(summary)
                    self.streams[ledger.stream] = ledger
                ledger.restore(summary)
            except (KeyError, TypeError, ValueError, AttributeError):
                continue  # a run.json edited by hand: the lines alone count

    # -- appending -----------------------------------------------------------
    def add(
        self, envelope: dict[str, Any], records: list[Record | ScalarRows], count: int
    ) -> list[dict[str, Any]]:
        """Append the ``count`` records of one message; returns the stored lines (what sinks
        receive)."""
        stream = envelope["stream"]
        ledger = self.streams.get(stream)
        if ledger is None:
            ledger = self.streams[stream] = StreamLedger.from_envelope(envelope)
            self.dirty = True
        source = None
        if stream not in self._announced:
            source = envelope
            self._announced.add(stream)
        ledger.observe_batch(records, count)
        rank = envelope["rank"]
        entries: list[dict[str, Any]] = []
        only_scalars = True
        for record in records:
            if isinstance(record, ScalarRows):
                entries.extend(_scalar_lines(record, rank, stream))
                continue
            kind, body = record.kind, record.body
            if kind == protocol.SCALARS:
                if not all(map(math.isfinite, body.values())):
                    body = {name: schema.encode_number(value) for name, value in body.items()}
                entries.append(
                    {
                        "kind": kind,
                        "step": record.step,
                        "rank": rank,
                        "t": record.t,
                        "stream": stream,
                        "seq": record.seq,
                        "metrics": body,
                    }
                )
                continue
            only_scalars = False
            line: dict[str, Any] = {
                "kind": kind,
                "step": record.step,
                "rank": rank,
                "t": record.t,
                "stream": stream,
                "seq": record.seq,
            }
            if kind == protocol.TENSOR and body.get("as") == "histogram":
                line["kind"] = schema.HISTOGRAM
                line.update(histograms.from_tensor(body, body["data"], self.histogram_bins))
            elif kind == protocol.TENSOR and body.get("as") == "histograms":
                # One record, one line per histogram (same seq: a resumed agent counts it once).
                line["kind"] = schema.HISTOGRAM
                batch = histograms.from_batch(body, body["data"], self.histogram_bins)
                entries.extend({**line, **fields} for fields in batch)
                continue
            elif kind == protocol.TENSOR:
                data = body.pop("data")
                body["offset"] = self._tensor_offset
                body["nbytes"] = len(data)
                self._tensor_parts.append(data)
                self._tensor_offset += len(data)
                line.update(body)
            else:
                line.update(body)
                self._note(kind, body, envelope)
            entries.append(line)
        if entries:
            if source is not None:
                entries[0]["source"] = source  # a stream's first line says who it is
            self._pending.append(_jsonl(entries, only_scalars))
            announces = stream if source is not None else None
            self._chunks.append(_Chunk(ledger, count, self._tensor_offset, announces))
        elif source is not None:
            self._announced.discard(stream)
        self.records += count
        self.last_record_time = time.time()
        self.dirty = True
        return entries

    def add_local(self, line: dict[str, Any]) -> dict[str, Any]:
        """An entry the agent itself makes (an alert, a sink failure): stored like the rest."""
        line = {
            "step": None,
            "rank": -1,
            "t": time.time(),
            "stream": schema.AGENT_STREAM,
            "seq": -1,
            **line,
        }
        self._pending.append(orjson.dumps(line))
        self._chunks.append(_Chunk(None, 1, self._tensor_offset, None))
        self.dirty = True
        return line

    def add_alert(self, alert: dict[str, Any]) -> dict[str, Any]:
        """An alert: in metrics.jsonl like every entry, and in alerts.jsonl for people."""
        line = self.add_local(alert)
        self._alert_lines.append((len(self._pending) - 1, self._pending[-1]))
        return line

    def _note(self, kind: str, body: dict[str, Any], envelope: dict[str, Any]) -> None:
        """Records that change run.json."""
        if kind == protocol.HELLO and envelope["rank"] == 0 and "trainer" not in self.info:
            self.info["trainer"] = {k: v for k, v in body.items() if k != "environment"}
            self.info["environment"] = runinfo.environment_from_hello(body)
            self.dirty = True
        elif kind == protocol.CONFIG:
            self.info["config"].update(body.get("params", {}))
            self.dirty = True
        elif kind == protocol.RUN_END:
            self.info["exit_status"] = body.get("exit_status")
            self.info["trainer_end_time"] = body.get("end_time")
            self.dirty = True
        elif kind == protocol.BYE:
            self.dirty = True

    def flush(self) -> int:
        """Hand appended lines and tensor bytes to the kernel (one write each).

        What the disk refuses is cut back to the last whole message kept, and
        its records are counted as not stored. Returns how many records (the
        trainers') were not stored; never raises for the disk.
        """
        if not self._pending:
            return 0
        pending, chunks, alerts = self._pending, self._chunks, self._alert_lines
        parts = self._tensor_parts
        self._pending, self._chunks, self._alert_lines, self._tensor_parts = [], [], [], []
        metrics, tensors = self._metrics, self._tensors
        if metrics is None or tensors is None:  # failing: the files are made again at the beat
            self._last_write_ok = False
            self._tensor_offset = 0 if tensors is None else tensors.size
            return self._not_stored(chunks, self._reason or STORE_ERROR)
        kept = len(pending)
        error: OSError | None = None
        tensor_start = tensors.size
        if parts:
            written, error = tensors.append(parts[0] if len(parts) == 1 else b"".join(parts))
            if error is not None:
                end = tensor_start + written
                kept = next((i for i, chunk in enumerate(chunks) if chunk.tensor_end > end), kept)
        if kept:
            if kept < len(pending):
                del pending[kept:]
            pending.append(b"")  # the trailing newline
            metrics_start = metrics.size
            written, metrics_error = metrics.append(b"\n".join(pending))
            if metrics_error is not None:
                error = metrics_error
                kept, whole = _whole_chunks(pending, kept, written)
                metrics.cut_to(metrics_start + whole)
        if alerts and kept:
            self._copy_alerts([line for index, line in alerts if index < kept])
        self._last_write_ok = error is None
        if error is None:
            return 0
        # tensors.bin keeps the bytes of the lines kept, no more: offsets stay true
        tensors.cut_to(chunks[kept - 1].tensor_end if kept else tensor_start)
        self._tensor_offset = tensors.size
        self._failed(error, "cannot write")
        return self._not_stored(chunks[kept:], reason_for(error))

    def holds_tensor(self, entry: dict[str, Any]) -> bool:
        """Whether a tensor line of the last flush has its bytes in tensors.bin."""
        end = int(entry.get("offset", 0)) + int(entry.get("nbytes", 0))
        return self._tensors is not None and end <= self._tensors.size

    def _copy_alerts(self, lines: list[bytes]) -> None:
        """alerts.jsonl: a copy of the alert lines kept, for people; whole lines only."""
        if not lines:
            return
        try:
            if self._alerts is None:
                self._alerts = AppendFile(self.dir / ALERTS)
        except OSError:
            return
        start = self._alerts.size
        lines.append(b"")
        written, error = self._alerts.append(b"\n".join(lines))
        if error is not None:
            self._alerts.cut_to(start + _whole_chunks(lines, len(lines) - 1, written)[1])

    def _not_stored(self, chunks: list[_Chunk], reason: str) -> int:
        """Count what was received but not stored, per stream, by reason."""
        lost = 0
        for chunk in chunks:
            if chunk.ledger is None:
                counts = self.agent_lines_not_stored
                counts[reason] = counts.get(reason, 0) + chunk.records
                continue
            chunk.ledger.not_stored[reason] = chunk.ledger.not_stored.get(reason, 0) + chunk.records
            lost += chunk.records
            if chunk.announces is not None:
                self._announced.discard(chunk.announces)  # the next line says who it is
        if chunks:
            self.dirty = True
        return lost

    def _failed(self, error: OSError, what: str) -> None:
        """The store cannot write: counted from now on, one store_failed alert per episode."""
        self._reason = reason_for(error)
        self._failed_since_beat = True
        message = f"{what} {self.dir}: {describe(error)}"
        if self.failure is None:
            self.failures += 1
            self.alarms.append(
                {
                    "name": STORE_FAILED,
                    "event": STORE_FAILED,
                    "severity": "critical",
                    "message": f"{message}; records are counted, not stored, until it can",
                    "attrs": {"reason": self._reason, "dir": str(self.dir)},
                }
            )
        self.failure = message
        self.dirty = True

    def _recovered(self) -> None:
        """A whole beat without a failed write (a nearly full disk takes a small write
        between two refusals: that is not yet space come back)."""
        logger.warning(
            "outrider agent: run store %s writes again (%d received records not stored so far)",
            self.dir,
            sum(sum(ledger.not_stored.values()) for ledger in self.streams.values()),
        )
        self.failure = None
        self.dirty = True

    def check_files(self) -> None:
        """Once a beat: a run directory removed under the agent is made again."""
        metrics = self._metrics
        if metrics is not None and not metrics.unlinked():
            return
        if metrics is not None:
            self._failed(FileNotFoundError(2, "run directory removed"), "lost")
        self._open_files()

    # -- run.json ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        streams = [ledger.summary() for ledger in self.streams.values()]
        steps = [s["last_step"] for s in streams if s["last_step"] is not None]
        info = dict(self.info)
        info["streams"] = streams
        info["last_step"] = max(steps) if steps else None
        info["records"] = sum(s["received"] for s in streams)
        info["dropped"] = sum(sum(s["dropped"].values()) for s in streams)
        info["lost"] = sum(s["lost"] for s in streams)
        not_stored: dict[str, int] = {}
        for summary in streams:
            for reason, count in summary["not_stored"].items():
                not_stored[reason] = not_stored.get(reason, 0) + count
        info["not_stored"] = not_stored
        info["store"] = {
            "failing": self.failure,
            "failures": self.failures,
            "agent_lines_not_stored": dict(self.agent_lines_not_stored),
        }
        if self.view is not None:
            info.update(self.view())
        return info

    def collect_info_later(self, collect: Callable[[], dict[str, Any]]) -> None:
        """Run ``collect`` on a helper thread; its result joins run.json when ready."""
        self._info_jobs.append(_INFO_POOL.submit(collect))

    def merge_collected(self, wait: float = 0.0) -> None:
        for job in list(self._info_jobs):
            try:
                self.info.update(job.result(timeout=wait))
            except concurrent.futures.TimeoutError:
                continue
            except Exception as exc:  # a probe of the environment failed: say so in run.json
                self.info.setdefault("info_errors", []).append(repr(exc))
            self._info_jobs.remove(job)
            self.dirty = True

    def write_info(self, final: bool = False) -> bool:
        """Replace run.json (write, fsync, rename); False, and still dirty, if it failed.

        Called once a beat: a failing store that wrote everything since the
        last beat, run.json included, writes again (at the close: whose last
        write went through)."""
        self.merge_collected()
        self.check_files()
        steady = not self._failed_since_beat or (final and self._last_write_ok)
        self._failed_since_beat = False
        recovering = self.failure is not None and steady
        info = self.snapshot()
        if recovering:
            info["store"]["failing"] = None
        try:
            self._run_json.replace(orjson.dumps(info, option=_JSON))
        except OSError as error:
            self._failed(error, "cannot write run.json in")
            return False
        self.dirty = False
        if recovering:
            self._recovered()
        return True

    def close(self, agent_counters: dict[str, Any] | None = None) -> None:
        self.flush()
        self.merge_collected(wait=10.0)
        self.info["end_time"] = time.time()
        self.info["status"] = self._final_status()
        if agent_counters is not None:
            self.info["agent"] = agent_counters
        if not self.write_info(final=True):
            logger.error(
                "outrider agent: run %s: run.json not updated: %s", self.run_id, self.failure
            )
        self._close_files()
        self._run_json.release()

    def _final_status(self) -> str:
        exit_status = self.info.get("exit_status")
        if exit_status is not None:
            if exit_status == 0:
                return "finished"
            return "killed" if exit_status < 0 or exit_status > 128 else "failed"
        if self.streams and all(ledger.said_bye for ledger in self.streams.values()):
            return "finished"
        return "incomplete"


def _whole_chunks(chunks: list[bytes], count: int, written: int) -> tuple[int, int]:
    """Of the first ``count`` chunks joined by newlines, how many a write of ``written``
    bytes holds whole, and their bytes (newlines included)."""
    whole = 0
    for index in range(count):
        size = len(chunks[index]) + 1
        if whole + size > written:
            return index, whole
        whole += size
    return count, whole


def _jsonl(entries: list[dict[str, Any]], only_scalars: bool) -> bytes:
    """The lines of one message as one bytes object (the per-line buffers are freed at once).

    ``scalars`` lines are serialised as one JSON array, then split: a line's
    only nested maps are its metrics and its source, whose values are numbers
    and strings, and a quote inside a JSON string is always escaped, so
    ``},{"kind":`` occurs exactly between two lines. One call instead of one
    per line halves the cost of writing a block.
    """
    if only_scalars:
        return orjson.dumps(entries)[1:-1].replace(b'},{"kind":', b'}\n{"kind":')
    return b"\n".join(map(orjson.dumps, entries))


def _scalar_lines(block: ScalarRows, rank: int, stream: str) -> list[dict[str, Any]]:
    """One stored line per record of a scalar block, as a ``scalars`` record gets."""
    names = block.names
    finite = all(map(math.isfinite, itertools.chain.from_iterable(block.rows)))
    if not finite:
        rows = [_encoded(names, row) for row in block.rows]
    else:
        rows = [dict(zip(names, row, strict=True)) for row in block.rows]
    return [
        {
            "kind": protocol.SCALARS,
            "step": step,
            "rank": rank,
            "t": t,
            "stream": stream,
            "seq": seq,
            "metrics": metrics,
        }
        for seq, t, step, metrics in zip(block.seqs, block.ts, block.steps, rows, strict=True)
    ]


def _encoded(names: list[str], row: list[float | int]) -> dict[str, Any]:
    """A row with NaN or infinity: those as the strings JSON can carry."""
    return {name: schema.encode_number(value) for name, value in zip(names, row, strict=True)}
