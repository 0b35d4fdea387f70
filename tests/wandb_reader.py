"""Reading an offline W&B run back from its .wandb transaction log.

wandb 0.31 ships no Python reader for these files (its Go core reads them),
so the framing (leveldb log records after a ':W&B' header) is decoded here and
each record is parsed with wandb's own protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def wandb_records(path: Path) -> Iterator[bytes]:
    """The records of a .wandb file: leveldb log framing after a ':W&B' header."""
    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), f"{path} is not a wandb transaction log"
    block, pos, pending = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        checksum, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0:
            break
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == checksum, "corrupt record"
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        else:  # LAST
            yield pending + chunk


def _put(target: dict[str, Any], item: Any) -> None:
    keys = list(item.nested_key) or [item.key]
    for key in keys[:-1]:
        target = target.setdefault(key, {})
    target[keys[-1]] = json.loads(item.value_json)


@dataclass
class OfflineArtifact:
    """An artifact the run logged: its manifest's files as (size, the staged copy's path)."""

    name: str
    type: str
    aliases: list[str]
    metadata: dict[str, Any]
    files: dict[str, tuple[int, Path]]


@dataclass
class OfflineRun:
    """What a finished offline run holds, as wandb recorded it."""

    run_dir: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    step_metrics: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    exit_code: int | None = None
    artifacts: list[OfflineArtifact] = field(default_factory=list)

    def series(self, name: str) -> list[tuple[Any, Any]]:
        """(trainer/step, value) of every history row that has ``name``."""
        return [(row.get("trainer/step"), row[name]) for row in self.history if name in row]

    def table_rows(self, name: str) -> list[list[Any]]:
        """The rows of the last table logged as ``name``."""
        logged = [row[name] for row in self.history if name in row]
        assert logged and logged[-1]["_type"] == "table-file"
        return json.loads((self.run_dir / "files" / logged[-1]["path"]).read_text())["data"]  # type: ignore[no-any-return]


def read_offline_run(directory: Path, timeout: float = 30.0) -> OfflineRun:
    """The single offline run under ``directory/wandb``, decoded record by record.

    ``run.finish()`` can return before W&B's service has written its buffered
    records out (seen once under a loaded CI run: a file of just its header), so
    the file is read again until it holds the run's exit record, for at most
    ``timeout`` seconds; then what it holds is returned (or its corruption raised).
    """
    deadline = time.monotonic() + timeout
    while True:
        late = time.monotonic() > deadline
        try:
            run = _read_offline_run(directory)
        except AssertionError:  # a record cut short mid-write; corrupt if it stays so
            if late:
                raise
            run = None
        if run is not None and (run.exit_code is not None or late):
            return run
        time.sleep(0.1)


def _read_offline_run(directory: Path) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2

    (log,) = directory.glob("wandb/offline-run-*/run-*.wandb")
    run = OfflineRun(log.parent)
    for raw in wandb_records(log):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated, no stubs
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id = record.run.run_id
            for item in record.run.config.update:
                _put(run.config, item)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                _put(row, item)
            run.history.append(row)
        elif kind == "config":
            for item in record.config.update:
                _put(run.config, item)
        elif kind == "summary":
            for item in record.summary.update:
                _put(run.summary, item)
        elif kind == "metric" and record.metric.glob_name:
            run.step_metrics[record.metric.glob_name] = record.metric.step_metric
        elif kind == "artifact":
            art = record.artifact
            files = {f.path: (f.size, Path(f.local_path)) for f in art.manifest.contents}
            metadata = json.loads(art.metadata) if art.metadata else {}
            run.artifacts.append(
                OfflineArtifact(art.name, art.type, list(art.aliases), metadata, files)
            )
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run
