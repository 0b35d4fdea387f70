"""The run store's files on a disk that can fill up, turn read-only or vanish.

Appends are whole or undone: a write the disk cuts short is truncated back to
what the caller keeps, so a reader never meets half a line. run.json is
replaced atomically (write, fsync, rename) through a spare file whose blocks
are allocated ahead of time, so the final accounting still fits when the disk
is full. Nothing here raises for a full disk on the hot path: ``append``
returns what it wrote and the error, and the store decides what was kept.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

#: records the run store received but could not keep, by reason
STORE_FULL = "store_full"  # no space (ENOSPC), quota (EDQUOT), file size limit (EFBIG)
STORE_ERROR = "store_error"  # anything else: read-only, I/O error, directory gone

#: least bytes set aside for the next run.json (it takes twice the last one's size if larger)
RESERVE_BYTES = 64 * 1024
#: free bytes a runs directory needs to start a run: run.json's reserve, and as much for lines
START_BYTES = 2 * RESERVE_BYTES
PAGE = 4096

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC


def reason_for(error: OSError) -> str:
    """The not-stored reason an error counts under."""
    return STORE_FULL if error.errno in _FULL else STORE_ERROR


def describe(error: OSError) -> str:
    """What an unusable directory's error means, for a one-line message."""
    what = {
        errno.ENOSPC: "the filesystem is full",
        errno.EDQUOT: "the disk quota is used up",
        errno.EFBIG: "the file size limit is reached",
        errno.EROFS: "the filesystem is read-only",
        errno.EACCES: "no permission to write there",
        errno.EPERM: "no permission to write there",
        errno.ENOENT: "it does not exist and cannot be made",
        errno.ENOTDIR: "a part of its path is not a directory",
        errno.EEXIST: "it is a file, not a directory",
    }.get(error.errno or 0, "it cannot be written")
    return f"{what} ({error.strerror or error})"


def check_runs_dir(runs_dir: Path) -> str | None:
    """None if runs can be stored in ``runs_dir`` (made if missing), else why not.

    Writes, then removes, a file of ``START_BYTES``: a directory that cannot
    take that much cannot hold a run's lines and its final accounting.
    """
    check = runs_dir / f".outrider-check-{os.getpid()}"
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        if not runs_dir.is_dir():
            raise NotADirectoryError(errno.EEXIST, os.strerror(errno.EEXIST), str(runs_dir))
        fd = os.open(check, _OPEN_FLAGS | os.O_EXCL, 0o600)
        try:
            _write_all(fd, bytes(START_BYTES))
        finally:
            os.close(fd)
            check.unlink(missing_ok=True)
    except OSError as error:
        return describe(error)
    return None


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class AppendFile:
    """A file that grows only by whole appends: what a failed write left is cut back.

    ``size`` is what the file holds for its readers; the file is opened
    O_APPEND and written with one ``write`` per call (more only when the
    kernel takes part of it). A cut that fails (an I/O error) is tried again
    before the next append, which never lands after half a line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, _OPEN_FLAGS | os.O_APPEND, 0o644)
        self.size = os.fstat(self.fd).st_size
        self._end = self.size  # where the bytes really end, past ``size`` after a failure

    def append(self, data: bytes) -> tuple[int, OSError | None]:
        """Write ``data``; returns the bytes written and the error that stopped it, if any.

        After an error ``size`` is unchanged: the caller says with ``cut_to``
        how much of the written part to keep.
        """
        if self._end != self.size:
            error = self._truncate(self.size)
            if error is not None:
                return 0, error
        view = memoryview(data)
        written = 0
        error = None
        while written < len(data):
            try:
                written += os.write(self.fd, view[written:])
            except OSError as failure:
                error = failure
                break
        self._end = self.size + written
        if error is None:
            self.size = self._end
        return written, error

    def cut_to(self, size: int) -> None:
        """Keep the first ``size`` bytes (the end of the last whole line kept)."""
        self.size = size
        if self._end > size:
            self._truncate(size)

    def _truncate(self, size: int) -> OSError | None:
        try:
            os.ftruncate(self.fd, size)
        except OSError as error:
            return error
        self._end = size
        return None

    def unlinked(self) -> bool:
        """The file was deleted under us (its run directory removed)."""
        try:
            return os.fstat(self.fd).st_nlink == 0
        except OSError:
            return True

    def close(self) -> None:
        os.close(self.fd)


class ReservedJson:
    """A JSON file replaced atomically, through a spare file allocated ahead of time.

    The spare's blocks are allocated after every replace, while there is
    room; the next replace writes into them (no new blocks needed), truncates,
    fsyncs and renames over the file. A full disk then still takes the last
    run.json.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spare = path.with_name(f".{path.name}.next")

    def replace(self, payload: bytes) -> None:
        """Write, fsync, rename; raises OSError and leaves the file as it was."""
        fd = os.open(self.spare, _OPEN_FLAGS, 0o644)  # no O_TRUNC: its blocks are the reserve
        try:
            view = memoryview(payload)
            done = 0
            while done < len(payload):
                done += os.pwrite(fd, view[done:], done)
            os.ftruncate(fd, len(payload))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(self.spare, self.path)
        self.reserve(max(RESERVE_BYTES, 2 * len(payload)))

    def reserve(self, size: int) -> bool:
        """Allocate the spare's blocks, as many as the disk has up to ``size`` (a filesystem
        may undo a partial allocation, so smaller sizes are tried); False if none fit."""
        try:
            fd = os.open(self.spare, _OPEN_FLAGS, 0o644)
        except OSError:
            return False
        try:
            while size >= PAGE:
                try:
                    os.posix_fallocate(fd, 0, size)
                    return True
                except OSError:
                    size //= 2
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        """Give the reserve back (the run is closed)."""
        with contextlib.suppress(OSError):
            self.spare.unlink(missing_ok=True)
