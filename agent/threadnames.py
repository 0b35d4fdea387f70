"""Give the agent's threads their Python names at the OS level too.

Python (before 3.14) leaves every thread named after the process, so ``top -H``,
``ps -L``, ``py-spy top`` and ``/proc/<pid>/task/*/comm`` show a dozen
``python`` threads. Written to ``/proc/self/task/<tid>/comm`` they show as
``sink-wandb``, ``analysis``, ``system-sampler``...: which part of the agent takes
the CPU can then be read off from outside (``bench/bench_overhead.py`` does).

Linux only, and best effort: where ``/proc`` cannot be written nothing happens.
The main thread (the receive loop) keeps its name, which is the process's own
(``pgrep`` and ``ps`` match on it).
"""

from __future__ import annotations

import threading

#: the kernel keeps 15 characters of a thread's name
MAX_CHARS = 15
PREFIX = "outrider-"  # every agent thread has it; the process already says what it is


class ThreadNamer:
    """Names each live thread once; cheap enough to call on every beat (new threads
    appear late: a sink's client library starts its own when the first run opens)."""

    def __init__(self) -> None:
        self._named: set[int] = set()
        self._enabled = True

    def __call__(self) -> None:
        if not self._enabled:
            return
        main = threading.main_thread()
        threads = threading.enumerate()
        self._named &= {thread.native_id for thread in threads}  # the kernel reuses tids
        for thread in threads:
            tid = thread.native_id
            if tid is None or tid in self._named or thread is main:
                continue
            self._named.add(tid)
            try:
                with open(f"/proc/self/task/{tid}/comm", "w") as comm:
                    comm.write(os_name(thread.name))
            except FileNotFoundError:
                continue  # the thread ended meanwhile
            except OSError:
                self._enabled = False  # no /proc (another OS), or not writable: stop trying
                return


def os_name(name: str) -> str:
    """The name a thread shows at the OS level: without the ``outrider-`` prefix, 15 characters."""
    return name.removeprefix(PREFIX)[:MAX_CHARS]
