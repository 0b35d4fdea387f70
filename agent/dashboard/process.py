"""The dashboard as a process of its own beside the agent (or the job aggregator).

The agent binds the dashboard's socket itself, which is quick and tells at once whether
the port is free, and hands the listening socket to a child process (``python -P -m
agent.dashboard``) that serves it. Pages then never take the receive loop's GIL or CPU:
the child runs at a lower priority than the agent, reads the runs directory from disk
and exits when its parent goes. A port in use is one warning line; the agent and the
trainer go on without a dashboard.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: niceness the dashboard adds to the agent's own: it is the first thing to slow down
NICE = 5
#: environment variable that carries the token to the child (never its command line)
TOKEN_ENV = "OUTRIDER_DASHBOARD_TOKEN"
#: how often the child checks that its parent is still there
PARENT_CHECK_SECONDS = 1.0


def url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one); OSError if taken."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


@dataclass
class Dashboard:
    """A running dashboard child process and where it listens."""

    process: subprocess.Popen[bytes]
    url: str

    def stop(self, timeout: float = 3.0) -> None:
        """SIGTERM, then SIGKILL past ``timeout``: it holds nothing that needs saving."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(
    runs_dir: Path,
    host: str,
    port: int,
    token: str | None,
    warn: Callable[[str], None],
) -> Dashboard | None:
    """The dashboard over ``runs_dir`` in a child process, or None (warned once) when its
    address cannot be bound or the child cannot start."""
    try:
        sock = bind(host, port)
    except OSError as exc:
        warn(
            f"dashboard not started: cannot listen on {host}:{port} ({exc.strerror or exc}); "
            "the agent goes on without it (--dashboard HOST:PORT picks another)"
        )
        return None
    bound = sock.getsockname()[1]
    env = dict(os.environ)
    env.pop(TOKEN_ENV, None)
    if token:
        env[TOKEN_ENV] = token
    argv = [
        sys.executable,
        "-P",
        "-m",
        "agent.dashboard",
        "--runs-dir",
        str(runs_dir),
        "--fd",
        str(sock.fileno()),
        "--parent-pid",
        str(os.getpid()),
    ]
    try:
        process = subprocess.Popen(
            argv, pass_fds=(sock.fileno(),), env=env, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        warn(f"dashboard not started: {exc}")
        return None
    finally:
        sock.close()
    return Dashboard(process, url(host, bound))


def serve(sock: socket.socket, runs_dir: Path, token: str | None, parent_pid: int | None) -> None:
    """Serve the dashboard on ``sock`` until SIGTERM/SIGINT or the parent's exit."""
    from aiohttp import web

    from agent.dashboard.server import make_app

    async def main() -> None:
        app = make_app(runs_dir, token)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock, shutdown_timeout=1.0).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), PARENT_CHECK_SECONDS)
                if parent_pid is not None and os.getppid() != parent_pid:
                    break
        finally:
            await runner.cleanup()

    asyncio.run(main())
