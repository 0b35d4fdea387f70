"""What run.json says about where and how a run was made.

Collected by the agent on a helper thread (never the trainer, never the receive
thread): host, Python and torch versions, CPU and GPU, the git commit of the
trainer's directory with its uncommitted change as git.patch, and the installed
packages as requirements.txt. The trainer's own environment variables come in
its hello (``probe.identity.trainer_environment``).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from probe.identity import trainer_environment

GIT_PATCH = "git.patch"
REQUIREMENTS = "requirements.txt"
#: git.patch holds at most this much of ``git diff HEAD``; run.json says when it was cut
MAX_PATCH_BYTES = 1024 * 1024
#: untracked files named in run.json, at most
MAX_UNTRACKED = 100
_GIT_TIMEOUT = 30.0


def _git(cwd: str | os.PathLike[str], *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout.strip()


def git_info(
    cwd: str | os.PathLike[str],
    run_dir: Path | None = None,
    max_patch_bytes: int = MAX_PATCH_BYTES,
) -> dict[str, Any] | None:
    """Commit, branch, dirty flag and untracked files of the repository holding ``cwd``;
    None outside one. With ``run_dir``, the uncommitted change (staged or not) goes to
    git.patch there, so the run can be rebuilt from the commit plus the patch."""
    try:
        commit = _git(cwd, "rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return None
    info: dict[str, Any] = {"commit": commit, "branch": None, "dirty": None}
    try:
        info["branch"] = _git(cwd, "rev-parse", "--abbrev-ref", "HEAD")
        info["dirty"] = bool(_git(cwd, "status", "--porcelain", "--untracked-files=no"))
        untracked = _git(cwd, "ls-files", "--others", "--exclude-standard", "-z").split("\0")
        untracked = [name for name in untracked if name]
    except (OSError, subprocess.SubprocessError):
        return info
    info["untracked"] = untracked[:MAX_UNTRACKED]
    info["untracked_count"] = len(untracked)
    if run_dir is not None:
        info.update(_write_patch(cwd, run_dir, max_patch_bytes, bool(info["dirty"])))
    return info


def _write_patch(
    cwd: str | os.PathLike[str], run_dir: Path, max_bytes: int, dirty: bool
) -> dict[str, Any]:
    """``git diff HEAD`` into run_dir/git.patch, streamed and cut at ``max_bytes``."""
    patch_file = run_dir / GIT_PATCH
    if not dirty:
        with contextlib.suppress(OSError):
            patch_file.unlink()  # a restarted run's old patch no longer describes it
        return {"patch": None, "patch_bytes": 0, "truncated": False}
    total = 0
    deadline = time.monotonic() + _GIT_TIMEOUT
    command = ["git", "-C", str(cwd), "diff", "HEAD", "--binary", "--no-color", "--no-ext-diff"]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with (
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as diff,
            open(patch_file, "wb") as out,
        ):
            assert diff.stdout is not None  # stdout=PIPE
            try:
                while chunk := diff.stdout.read(65536):
                    if total < max_bytes:
                        out.write(chunk[: max_bytes - total])
                    total += len(chunk)
                    if time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(command, _GIT_TIMEOUT)
                status = diff.wait(timeout=max(0.1, deadline - time.monotonic()))
            finally:
                if diff.poll() is None:
                    diff.kill()
    except (OSError, subprocess.SubprocessError) as error:
        return {"patch": None, "patch_bytes": total, "truncated": False, "error": repr(error)}
    if status != 0:
        failure = f"git diff exited with {status}"
        return {"patch": None, "patch_bytes": total, "truncated": False, "error": failure}
    return {"patch": GIT_PATCH, "patch_bytes": total, "truncated": total > max_bytes}


def write_requirements(run_dir: Path) -> dict[str, Any]:
    """The installed distributions, ``name==version`` sorted as pip freeze would, into
    run_dir/requirements.txt; run.json keeps the count and whose interpreter they are."""
    ordered = installed_pins()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / REQUIREMENTS).write_text("".join(f"{pin}\n" for pin in ordered))
    return {"file": REQUIREMENTS, "count": len(ordered), "python": sys.executable}


def installed_pins() -> tuple[str, ...]:
    """``name==version`` of every distribution this interpreter sees, sorted.

    Reading every distribution's metadata takes about 0.1 s; an agent that opens
    many runs reads them again only once a directory on ``sys.path`` has changed
    (a ``pip install`` adds or removes a ``.dist-info`` there).
    """
    stamps = []
    for entry in sys.path:
        with contextlib.suppress(OSError):
            stamps.append((entry, os.stat(entry or ".").st_mtime_ns))
    return _pins(tuple(stamps))


@functools.lru_cache(maxsize=1)
def _pins(stamps: tuple[tuple[str, int], ...]) -> tuple[str, ...]:
    pins = set()
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            pins.add(f"{name}=={dist.version}")
    return tuple(sorted(pins, key=str.lower))


def environment_from_hello(body: dict[str, Any]) -> dict[str, str]:
    """The trainer's environment a hello carries, filtered again on this side: an older or
    foreign probe gets the same rule (no secrets, known prefixes, capped) as ours."""
    sent = body.get("environment")
    if not isinstance(sent, dict):
        return {}
    return trainer_environment({k: v for k, v in sent.items() if isinstance(k, str)})


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


def collect(cwd: str | None = None, run_dir: Path | None = None) -> dict[str, Any]:
    """The environment half of run.json; with ``run_dir``, git.patch and requirements.txt."""
    info: dict[str, Any] = {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "outrider": _version("outrider"),
        "cpu": cpu_info(),
        "gpus": gpu_info(),
        "git": git_info(cwd, run_dir) if cwd else None,
    }
    if run_dir is not None:
        try:
            info["packages"] = write_requirements(run_dir)
        except OSError as error:
            info["packages"] = {"file": None, "error": repr(error)}
    return info
