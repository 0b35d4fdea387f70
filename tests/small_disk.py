"""A real small filesystem for disk-full tests: a 1 MiB tmpfs when the tests run as root
(as on CI), else a file size limit (RLIMIT_FSIZE) on an ordinary directory.

The tmpfs can fill up (a filler file), get its space back (the filler removed),
turn read-only and writable again (remount). The fallback can only stand for a
full disk, in this process (``fill``/``make_room``) or in a child (``preexec``);
tests that need more call ``require_tmpfs`` and are skipped with the reason.
``OUTRIDER_TEST_DISK=rlimit`` picks the fallback as root too.
"""

from __future__ import annotations

import errno
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

SIZE = 1 << 20
CHUNK = 64 * 1024


class SmallDisk:
    """``dir`` is on the small filesystem; ``close`` unmounts it."""

    def __init__(self, base: Path, size: int = SIZE) -> None:
        self.mount = base / "disk"
        self.mount.mkdir(parents=True)
        self.dir = self.mount / "runs"
        self.filler = self.mount / "filler"
        # OUTRIDER_TEST_DISK=rlimit tries the fallback as root too
        self.tmpfs = os.geteuid() == 0 and os.environ.get("OUTRIDER_TEST_DISK") != "rlimit"
        self._limit: tuple[int, int] | None = None
        if self.tmpfs:
            subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(self.mount)],
                check=True,
                capture_output=True,
            )

    def require_tmpfs(self, what: str) -> None:
        if not self.tmpfs:
            pytest.skip(f"{what} needs a tmpfs mount, which needs root; a file size limit cannot")

    def free(self) -> int:
        stat = os.statvfs(self.mount)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int = 0) -> None:
        """Take every free byte but ``leave`` (rounded to pages by tmpfs)."""
        if not self.tmpfs:
            biggest = max(
                (p.stat().st_size for p in self.mount.rglob("*") if p.is_file()), default=0
            )
            self._limit = resource.getrlimit(resource.RLIMIT_FSIZE)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (biggest + leave, self._limit[1]))
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            block = bytes(CHUNK)
            while True:
                try:
                    os.write(fd, block[: max(4096, min(CHUNK, self.free()))])
                except OSError as error:
                    assert error.errno == errno.ENOSPC, error
                    break
        finally:
            os.close(fd)
        if leave:
            os.truncate(self.filler, max(0, self.filler.stat().st_size - leave))

    def make_room(self) -> None:
        """Space comes back: the filler is deleted (or the size limit lifted)."""
        if self._limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, self._limit)
            self._limit = None
        self.filler.unlink(missing_ok=True)

    def read_only(self) -> None:
        self.require_tmpfs("a read-only filesystem")
        subprocess.run(["mount", "-o", "remount,ro", str(self.mount)], check=True)

    def writable(self) -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(self.mount)], check=True)

    def preexec(self, limit: int = SIZE) -> Callable[[], None] | None:
        """For a child process: nothing on tmpfs, else the file size limit of a 1 MiB disk."""
        if self.tmpfs:
            return None

        def limit_file_size() -> None:
            hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

        return limit_file_size

    def close(self) -> None:
        if self.tmpfs:
            subprocess.run(["umount", "-l", str(self.mount)], check=True, capture_output=True)
        else:
            self.make_room()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[SmallDisk]:
    """A 1 MiB filesystem (tmpfs as root, else a file size limit), removed afterwards."""
    disk = SmallDisk(tmp_path)
    try:
        yield disk
    finally:
        disk.close()
