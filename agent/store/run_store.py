"""The run store: ``<runs dir>/<run id>/`` with run.json, metrics.jsonl, tensors.bin.

It is the source of truth and is written before anything else sees a
record. Lines are appended with one write per receive cycle, so what the
agent has accepted is in the kernel's hands within milliseconds (it survives
the agent being SIGKILLed) and on disk within the OS's writeback.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from agent.ingest.accounting import StreamLedger
from agent.ingest.decode import Record, ScalarRows
from agent.store import histograms
from probe import protocol
from sinks import schema

RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
ALERTS = "alerts.jsonl"
TENSORS = "tensors.bin"

_INFO_POOL = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="outrider-runinfo")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    os.replace(tmp, path)


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
        self.dir.mkdir(parents=True, exist_ok=True)
        self.run_id = run_id
        self.streams: dict[str, StreamLedger] = {}
        self.info: dict[str, Any] = {"run_id": run_id}
        existing = self.dir / RUN_JSON
        if existing.exists():
            self._resume(existing)
        self.info.setdefault("start_time", time.time())
        self.info.setdefault("status", "running")
        self.info.setdefault("config", {})
        if meta:
            self.info.update(meta)
        self._metrics = open(self.dir / METRICS, "ab")  # noqa: SIM115 - lives as long as the run
        self._tensors = open(self.dir / TENSORS, "ab")  # noqa: SIM115
        self._tensor_offset = self._tensors.tell()
        self._pending: list[bytes] = []
        self._info_jobs: list[concurrent.futures.Future[dict[str, Any]]] = []
        self.dirty = True
        self.last_record_time = 0.0
        self.records = 0

    def _resume(self, run_json: Path) -> None:
        """A restarted agent picks up the run: its info and every stream's accounting."""
        try:
            self.info = orjson.loads(run_json.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            self.info = {"run_id": self.run_id}
        self.info["status"] = "running"
        self.info.pop("end_time", None)
        metrics = self.dir / METRICS
        if not metrics.exists():
            return
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

    # -- appending -----------------------------------------------------------
    def add(
        self, envelope: dict[str, Any], records: list[Record | ScalarRows], count: int
    ) -> list[dict[str, Any]]:
        """Append the ``count`` records of one message; returns the stored lines (what sinks
        receive)."""
        stream = envelope["stream"]
        ledger = self.streams.get(stream)
        source = None
        if ledger is None:
            ledger = self.streams[stream] = StreamLedger.from_envelope(envelope)
            source = envelope
            self.dirty = True
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
                self._tensors.write(data)
                self._tensor_offset += len(data)
                line.update(body)
            else:
                line.update(body)
                self._note(kind, body, envelope)
            entries.append(line)
        if source is not None and entries:
            entries[0]["source"] = source  # a stream's first line says who it is
        self._pending.append(_jsonl(entries, only_scalars))
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
        self.dirty = True
        return line

    def add_alert(self, alert: dict[str, Any]) -> dict[str, Any]:
        """An alert: in metrics.jsonl like every entry, and in alerts.jsonl for people."""
        line = self.add_local(alert)
        with open(self.dir / ALERTS, "ab") as alerts:
            alerts.write(orjson.dumps(line) + b"\n")
        return line

    def _note(self, kind: str, body: dict[str, Any], envelope: dict[str, Any]) -> None:
        """Records that change run.json."""
        if kind == protocol.HELLO and envelope["rank"] == 0 and "trainer" not in self.info:
            self.info["trainer"] = body
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

    def flush(self) -> None:
        """Hand appended lines and tensor bytes to the kernel (one write each)."""
        chunks = [chunk for chunk in self._pending if chunk]
        self._pending.clear()
        if chunks:
            chunks.append(b"")  # the trailing newline
            self._metrics.write(b"\n".join(chunks))
            self._metrics.flush()
        self._tensors.flush()

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

    def write_info(self) -> None:
        self.merge_collected()
        write_json_atomic(self.dir / RUN_JSON, self.snapshot())
        self.dirty = False

    def close(self, agent_counters: dict[str, Any] | None = None) -> None:
        self.flush()
        self.merge_collected(wait=10.0)
        self.info["end_time"] = time.time()
        self.info["status"] = self._final_status()
        if agent_counters is not None:
            self.info["agent"] = agent_counters
        self.write_info()
        self._metrics.close()
        self._tensors.close()

    def _final_status(self) -> str:
        exit_status = self.info.get("exit_status")
        if exit_status is not None:
            if exit_status == 0:
                return "finished"
            return "killed" if exit_status < 0 or exit_status > 128 else "failed"
        if self.streams and all(ledger.said_bye for ledger in self.streams.values()):
            return "finished"
        return "incomplete"


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
