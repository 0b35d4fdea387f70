"""What run.json says about where and how a run was made.

Collected by the agent (never the trainer): host, Python and torch versions,
CPU and GPU, and the git commit and dirty flag of the trainer's directory.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import socket
import subprocess
from pathlib import Path
from typing import Any


def git_info(cwd: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Commit, branch and dirty flag of the repository holding ``cwd``; None outside one."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(cwd), *args],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    try:
        branch = git("rev-parse", "--abbrev-ref", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        branch, dirty = None, None
    return {"commit": commit, "branch": branch, "dirty": dirty}


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_info() -> dict[str, Any]:
    model = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model, "logical_cores": os.cpu_count(), "machine": platform.machine()}


def gpu_info() -> list[dict[str, Any]]:
    """NVIDIA GPUs through NVML; an empty list where there are none."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError on hosts without a driver
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(
                {
                    "index": index,
                    "name": name.decode() if isinstance(name, bytes) else name,
                    "uuid": pynvml.nvmlDeviceGetUUID(handle),
                    "memory_bytes": int(memory.total),
                }
            )
        return gpus
    except Exception:
        return []
    finally:
        pynvml.nvmlShutdown()


def collect(cwd: str | None = None) -> dict[str, Any]:
    """The environment half of run.json."""
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "outrider": _version("outrider"),
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "git": git_info(cwd) if cwd else None,
    }
