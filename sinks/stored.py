"""A run's stored lines as sink batches again: what ``outrider replay`` sends, and what the
W&B sink writes at a run's end when it writes offline runs from the run store.

The sinks get what they would have got live: ``Batch`` objects of the stored lines, in
their stored order, grouped by the stream each came from (its ``source``, which the
stream's first line carries), with the original steps and times; only the launcher's
``run_end`` comes last, so the lines the agent stored after it (its last summaries and
images) reach sinks that close a run at its end. The agent's own lines get the source the
agent gave them live.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from probe import protocol
from sinks import schema
from sinks.base import Batch, Source

#: the run store's files (agent/store/run_store.py writes them)
METRICS = "metrics.jsonl"
RUN_JSON = "run.json"
#: the stream names the job aggregator gives its sinks' batches (agent.aggregation.aggregator)
JOB_RANK_STREAM = "node"
JOB_OWN_STREAM = "aggregator"

BATCH_ENTRIES = 512  # most entries in one rebuilt batch


def iter_lines(run_dir: Path) -> Iterator[dict[str, Any]]:
    """Every parseable stored entry, in order (a corrupt or cut line skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    with open(path, "rb") as lines:
        for line in lines:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(entry, dict):
                yield entry


def load_info(run_dir: Path) -> dict[str, Any]:
    """run.json, or {} when it is missing or unreadable."""
    try:
        info = orjson.loads((Path(run_dir) / RUN_JSON).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


class Sources:
    """The ``Source`` of each stored line, as the agent (or job aggregator) gave it live."""

    def __init__(self, info: dict[str, Any], run_id: str) -> None:
        self.run_id = run_id
        self.host = str(info.get("host") or "")
        self.streams: dict[str, Source] = {}
        for stream in info.get("streams") or []:
            if isinstance(stream, dict):
                source = self._from(stream)
                if source is not None:
                    self.streams[source.stream] = source
        job = info.get("job")
        self.job_ranks = len(job.get("ranks") or []) if isinstance(job, dict) else None

    def _from(self, fields: dict[str, Any]) -> Source | None:
        try:
            values = {key: fields[key] for key in protocol.ENVELOPE_KEYS if key != "run"}
            return Source(run=self.run_id, **values)
        except (KeyError, TypeError):
            return None

    def of(self, entry: dict[str, Any]) -> Source:
        stream = entry.get("stream")
        rank = entry.get("rank")
        rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else -1
        if stream == schema.AGENT_STREAM:
            named = entry.get("host")
            host = named if isinstance(named, str) else self.host
            if self.job_ranks is not None:  # a job view: the aggregator's sources
                name = JOB_RANK_STREAM if rank >= 0 else JOB_OWN_STREAM
                return Source(self.run_id, name, rank, -1, max(self.job_ranks, 1), host, 0)
            return Source(self.run_id, schema.AGENT_STREAM, rank, -1, 0, host, 0)
        announced = entry.get("source")
        if isinstance(announced, dict):
            source = self._from(announced)
            if source is not None:
                self.streams[source.stream] = source
                return source
        known = self.streams.get(str(stream))
        if known is not None:
            return known
        source = Source(self.run_id, str(stream), rank, rank, 1, self.host, 0)
        self.streams[source.stream] = source
        return source


def batches(lines: Iterable[dict[str, Any]], sources: Sources, run_dir: Path) -> Iterator[Batch]:
    """Consecutive lines of one source as one batch, in stored order."""
    current: Source | None = None
    entries: list[dict[str, Any]] = []
    for entry in lines:
        source = sources.of(entry)
        if entries and (source != current or len(entries) >= BATCH_ENTRIES):
            yield Batch(current, entries, str(run_dir))  # type: ignore[arg-type]
            entries = []
        current = source
        entries.append(entry)
    if entries:
        yield Batch(current, entries, str(run_dir))  # type: ignore[arg-type]


def run_end_last(lines: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The lines in order, but the launcher's ``run_end`` after every other: sinks close a
    run at its run_end, and the agent stores its last summaries and images after it."""
    held = []
    for entry in lines:
        if entry.get("kind") == protocol.RUN_END:
            held.append(entry)
        else:
            yield entry
    yield from held
