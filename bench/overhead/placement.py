"""Where trainer and agent run: on separate cores (``sep``) or sharing them (``shared``).

With separate cores the trainer has CPU 0 and one torch thread, and whatever
monitors it out of process (the agent, W&B's service) has CPU 1; threads
inside the trainer process (the probe's sender, TensorBoard's writer) stay
on CPU 0, where they cost the training thread.
"""

from __future__ import annotations

import os

TRAINER_CPU = 0
AGENT_CPU = 1


def pin_threads_of(pid: int, cpus: set[int]) -> int:
    """Pin every thread of ``pid`` and of its descendants to ``cpus``; returns the count.

    Threads one by one: a process already running has threads that ignore a
    later affinity change of its main thread.
    """
    import psutil

    pinned = 0
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0
    for proc in procs:
        try:
            tids = [t.id for t in proc.threads()]
        except psutil.Error:
            continue
        for tid in tids:
            try:
                os.sched_setaffinity(tid, cpus)
                pinned += 1
            except OSError:
                pass
    return pinned
