"""Where the agent listens: a private IPC socket by default, never another user's.

An IPC socket lives in a directory only its owner can enter; a TCP endpoint
is whatever the user passed (loopback unless told otherwise, see the CLI).
"""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from pathlib import Path

IPC = "ipc://"


def private_ipc_dir() -> Path:
    """A fresh directory only this user can enter, for the IPC socket."""
    return Path(tempfile.mkdtemp(prefix="outrider-"))  # mkdtemp creates it 0700


def default_endpoint() -> str:
    """``ipc://`` in a per-user 0700 directory (checked, never trusted blindly)."""
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    directory = Path(base) / f"outrider-{os.getuid()}"
    directory.mkdir(mode=0o700, exist_ok=True)
    info = directory.stat()
    if info.st_uid != os.getuid() or stat.S_IMODE(info.st_mode) & 0o077:
        raise PermissionError(
            f"{directory} must be owned by you with mode 0700 (it holds the agent's socket); "
            "fix or remove it, or pass --endpoint"
        )
    return f"{IPC}{directory / 'agent.sock'}"


def ipc_path(endpoint: str) -> Path | None:
    """The socket file of an ``ipc://`` endpoint; None for any other transport."""
    return Path(endpoint.removeprefix(IPC)) if endpoint.startswith(IPC) else None


def claim_ipc_path(path: Path, endpoint: str) -> None:
    """Refuse a socket another agent is serving; remove a stale one a dead agent left."""
    if not path.exists():
        return
    if _socket_is_live(path):
        raise OSError(f"another agent is already listening at {endpoint}")
    path.unlink()


def _socket_is_live(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket at ``path``."""
    probe_socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe_socket.settimeout(1.0)
        probe_socket.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe_socket.close()
