"""Checking the trainer's checkpoints off its thread: there, whole, hashed, a torch archive.

A ``checkpoint`` event (``probe.checkpoint.save``, or any saver that sends one
with ``path`` and ``size``) is checked on one background thread of the agent:
the file must exist with the size the trainer saw and be a zip archive with
torch's ``data.pkl`` record (what ``torch.save`` writes); its sha256 is computed
while it is read. Nothing is unpickled (design rule 6), so the check says the
file is whole, not that it loads. A file its saver's rotation has already
deleted (no longer in its directory's ``index.json``) is skipped, not failed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

from agent.analysis.messages import CheckpointChecked, CheckpointSaved
from probe.checkpoint import INDEX
from sinks.schema import CHECKPOINT_FAILED, CHECKPOINT_SKIPPED, CHECKPOINT_VERIFIED

__all__ = [
    "CHECKPOINT_FAILED",
    "CHECKPOINT_SKIPPED",
    "CHECKPOINT_VERIFIED",
    "CheckpointChecks",
    "check",
]

logger = logging.getLogger("outrider.agent")

QUEUE_LIMIT = 1_000  # checkpoints waiting for their check; more are counted as not checked
CHUNK = 1 << 20  # bytes hashed per read; hashlib releases the GIL on chunks this size


def check(saved: CheckpointSaved) -> CheckpointChecked:
    """Size, sha256 and archive structure of one saved checkpoint."""
    path = Path(saved.path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        if _rotated_away(path):
            return CheckpointChecked(saved, None, None, rotated=True)
        return CheckpointChecked(saved, None, f"{path} does not exist")
    except OSError as exc:
        return CheckpointChecked(saved, None, f"{path} cannot be read: {exc}")
    if saved.size is not None and size != saved.size:
        return CheckpointChecked(
            saved, None, f"{path} is {size} bytes, the trainer saved {saved.size}"
        )
    digest = hashlib.sha256()
    try:
        with path.open("rb") as file:
            while chunk := file.read(CHUNK):
                digest.update(chunk)
        problem = _archive_problem(path)
    except OSError as exc:
        return CheckpointChecked(saved, None, f"{path} cannot be read: {exc}")
    return CheckpointChecked(saved, digest.hexdigest(), problem)


def _archive_problem(path: Path) -> str | None:
    """None for a zip archive whose directory reads and holds torch's ``data.pkl``."""
    if not zipfile.is_zipfile(path):
        return f"{path} is not a torch zip archive (truncated or corrupt)"
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, ValueError) as exc:
        return f"{path}: its zip directory does not read ({exc})"
    if not any(name == "data.pkl" or name.endswith("/data.pkl") for name in names):
        return f"{path} is a zip archive without torch's data.pkl"
    return None


def _rotated_away(path: Path) -> bool:
    """The saver's index.json exists and no longer lists the file: rotation deleted it."""
    try:
        index = json.loads((path.parent / INDEX).read_bytes())
        listed = {str(entry.get("path")) for entry in index["checkpoints"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
    return path.name not in listed


class CheckpointChecks:
    """One lazily started thread that checks saved checkpoints in turn, bounded."""

    def __init__(self, deliver: Callable[[CheckpointChecked], None]) -> None:
        self._deliver = deliver
        self._queue: queue.Queue[CheckpointSaved | None] = queue.Queue(QUEUE_LIMIT)
        self._thread: threading.Thread | None = None
        self.not_checked = 0  # past QUEUE_LIMIT

    def submit(self, saved: CheckpointSaved) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="outrider-checkpoints", daemon=True
            )
            self._thread.start()
        try:
            self._queue.put_nowait(saved)
        except queue.Full:
            self.not_checked += 1
            logger.warning(
                "outrider agent: %d checkpoints wait for their check; %s is not checked",
                QUEUE_LIMIT,
                saved.path,
            )

    def close(self, timeout: float) -> None:
        """Finish the checks queued so far, within ``timeout``."""
        thread = self._thread
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=max(0.0, timeout))
        except queue.Full:
            return
        thread.join(max(0.0, deadline - time.monotonic()))

    def _run(self) -> None:
        while (saved := self._queue.get()) is not None:
            try:
                result = check(saved)
            except Exception as exc:  # a bug here must not end the checks, nor blame the file
                logger.warning("outrider agent: checking %s failed: %r", saved.path, exc)
                continue
            self._deliver(result)
