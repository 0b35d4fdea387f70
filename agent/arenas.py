"""Fewer glibc malloc arenas for the agent tree: its memory budget is RSS, not speed.

glibc gives a thread that finds the main heap busy an arena of its own, up to
8 per core. The agent has a dozen threads (receive loop, analysis, a worker
per sink, TensorBoard's and W&B's writers), each freeing and allocating
buffers of its own, and memory freed into an arena that no other thread uses
stays resident. Two arenas are plenty for threads that are mostly idle.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys

logger = logging.getLogger("outrider.agent")

#: the arenas the agent's processes keep (MALLOC_ARENA_MAX, when the user has not set it)
ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h


def limit_malloc_arenas(arenas: int = ARENAS) -> int | None:
    """Cap this process's malloc arenas, and its children's (statistics workers, W&B's
    service) through MALLOC_ARENA_MAX; a value the user set is kept. Call it before the
    agent starts its threads. Returns the cap applied here, or None where there is no
    glibc ``mallopt`` (musl, macOS)."""
    wanted = os.environ.setdefault("MALLOC_ARENA_MAX", str(arenas))
    if not sys.platform.startswith("linux"):
        return None
    try:
        cap = int(wanted)
    except ValueError:
        logger.warning("outrider agent: MALLOC_ARENA_MAX=%r is not a number; left alone", wanted)
        return None
    with contextlib.suppress(OSError, AttributeError):
        if ctypes.CDLL(None).mallopt(_M_ARENA_MAX, cap) == 1:
            return cap
    return None
