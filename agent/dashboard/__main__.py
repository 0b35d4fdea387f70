"""``python -P -m agent.dashboard``: the dashboard process the agent starts.

It is given an already listening socket (``--fd``) by its parent, and the token, if any,
in the environment (``OUTRIDER_DASHBOARD_TOKEN``), never on its command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from pathlib import Path

from agent.dashboard.process import NICE, TOKEN_ENV, serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -P -m agent.dashboard")
    parser.add_argument("--runs-dir", type=Path, required=True)
    parser.add_argument("--fd", type=int, required=True, help="a listening TCP socket")
    parser.add_argument("--parent-pid", type=int, help="exit when this process is gone")
    args = parser.parse_args()
    with contextlib.suppress(OSError):
        os.nice(NICE)
    sock = socket.socket(fileno=args.fd)
    with contextlib.suppress(KeyboardInterrupt):
        serve(sock, args.runs_dir, os.environ.get(TOKEN_ENV) or None, args.parent_pid)


if __name__ == "__main__":
    main()
