"""One TensorBoard event file, written on the calling thread (the sink's own worker).

TensorBoard's ``EventFileWriter`` hands every event to a writer thread of its
own through a queue, and without TensorFlow its file layer opens, appends to
and closes the file for every record. In the agent, on cores the trainer
uses, that was a third of the TensorBoard sink's CPU: a thread wake-up and
three system calls per event. The sink already runs on its own thread, so
this writes each record into a buffered file there and flushes once per
export. The records are TensorBoard's own (its ``RecordWriter`` frames them),
so TensorBoard reads the files as it reads its own writer's.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# TensorBoard ships no type stubs and no py.typed marker: its objects are Any here.
from tensorboard.compat.proto import event_pb2  # type: ignore[import-untyped]
from tensorboard.summary.writer.record_writer import RecordWriter  # type: ignore[import-untyped]

#: a file's first event, as TensorBoard's own writer starts one (readers check the version)
FILE_VERSION = "brain.Event:2"
#: bytes buffered before a write reaches the file (a flush always does)
BUFFER_BYTES = 256 * 1024

_serial = itertools.count()


class EventFile:
    """An event file in ``directory``, named as TensorBoard names its own."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        name = (
            f"events.out.tfevents.{int(clock()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_serial)}"
        )
        self.path = directory / name
        self._file = open(self.path, "xb", buffering=BUFFER_BYTES)  # noqa: SIM115 - closed in close()
        self._records = RecordWriter(self._file)
        first = event_pb2.Event(
            wall_time=clock(),
            file_version=FILE_VERSION,
            source_metadata=event_pb2.SourceMetadata(writer="outrider"),
        )
        self.add_event(first)
        self.flush()

    def add_event(self, event: Any) -> None:
        """Frame and buffer one ``Event`` (written to the file by a flush at the latest)."""
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        """Flush and close; a failed flush still closes the file, then raises."""
        self._file.close()
