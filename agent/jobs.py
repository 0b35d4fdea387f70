"""Bounded workers for the agent's expensive statistics (rank, t-SNE, images).

A statistic that takes longer than the trainer takes to produce its input
must not build a backlog: for each key (one feature stream, one run's
dashboard) only the newest pending job is kept, and the one it replaces is
counted as superseded. Workers run at a lower priority than the rest of the
agent, which itself runs below the trainer (optionally SCHED_IDLE: only
cycles nobody else wants), so on a shared core the statistics are what waits.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.counters import RateLimitedLog

logger = logging.getLogger("outrider.agent")


@dataclass
class JobFigures:
    """What one kind of job cost: shown as ``outrider_stat_job_duration_seconds``."""

    count: int = 0
    seconds_sum: float = 0.0
    seconds_max: float = 0.0
    last_seconds: float = 0.0
    superseded: int = 0
    failed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "seconds_sum": self.seconds_sum,
            "seconds_max": self.seconds_max,
            "last_seconds": self.last_seconds,
            "superseded": self.superseded,
            "failed": self.failed,
        }


@dataclass
class _Job:
    name: str
    work: Callable[..., Any]
    args: tuple[Any, ...]
    done: Callable[[Any], None]
    figures: JobFigures = field(repr=False, default_factory=JobFigures)


def _worker_process_setup(nice: int, idle: bool, blas_threads: int) -> None:
    """In a statistics worker process: ``nice`` below the agent, SCHED_IDLE (Linux: only
    cycles nothing else wants), one BLAS thread, deaf to ^C (the agent stops it)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
            if idle:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=blas_threads)


class StatsJobs:
    """``threads`` workers over a table of pending jobs, one per key, newest wins.

    With ``processes``, each worker thread runs its jobs in a worker process
    (started on the first job): a statistic in C code that holds Python's GIL
    (a matplotlib draw, an openTSNE step) would otherwise stall the agent's
    receive loop. Jobs are then module-level functions with picklable arguments.
    ``nice`` and ``idle`` apply to those processes only: a thread of the agent
    at a lower priority would hold the GIL while starved and stall the receive
    loop behind it (priority inversion).
    """

    def __init__(
        self,
        threads: int = 1,
        nice: int = 0,
        idle: bool = False,
        processes: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if threads < 1:
            raise ValueError(f"stats threads must be >= 1, got {threads}")
        self.nice = nice
        self.sched_idle = idle
        self.processes = processes
        self.clock = clock
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._pending: collections.OrderedDict[Any, _Job] = collections.OrderedDict()
        self._figures: dict[str, JobFigures] = {}
        self._running_keys: set[Any] = set()
        self._running = 0
        self._closed = False
        self._wake = threading.Condition()
        self._complaints = RateLimitedLog()
        self._threads = [
            threading.Thread(target=self._work, name=f"outrider-stats-{i}", daemon=True)
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(
        self,
        key: Any,
        name: str,
        work: Callable[..., Any],
        done: Callable[[Any], None],
        args: tuple[Any, ...] = (),
    ) -> None:
        """Queue ``work(*args)``; ``done(result)`` runs on the worker thread. Replaces
        ``key``'s pending job."""
        with self._wake:
            if self._closed:
                return
            figures = self._figures.setdefault(name, JobFigures())
            previous = self._pending.pop(key, None)
            if previous is not None:
                previous.figures.superseded += 1
            self._pending[key] = _Job(name, work, args, done, figures)
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return len(self._pending)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.05))
            return True

    def figures(self) -> dict[str, dict[str, Any]]:
        """Per job name: count, seconds_sum/max/last, superseded, failed (thread-safe copy)."""
        with self._wake:
            return {name: figures.as_dict() for name, figures in self._figures.items()}

    def _next_key(self) -> Any:
        """The oldest pending key not being worked on (one job per key at a time)."""
        for key in self._pending:
            if key not in self._running_keys:
                return key
        return None

    def _work(self) -> None:
        while True:
            with self._wake:
                key = self._next_key()
                while key is None and not self._closed:
                    self._wake.wait()
                    key = self._next_key()
                if self._closed:
                    return
                job = self._pending.pop(key)
                self._running_keys.add(key)
                self._running += 1
            started = self.clock()
            try:
                job.done(self._call(job))
                failed = False
            except Exception as exc:  # a statistic that fails must not end the worker
                failed = True
                self._complaints.warning(
                    f"job:{job.name}", "outrider agent: statistic %s failed: %r", job.name, exc
                )
            elapsed = self.clock() - started
            with self._wake:
                self._running -= 1
                self._running_keys.discard(key)
                figures = job.figures
                figures.count += 1
                figures.failed += failed
                figures.seconds_sum += elapsed
                figures.last_seconds = elapsed
                figures.seconds_max = max(figures.seconds_max, elapsed)
                self._wake.notify_all()

    def _call(self, job: _Job) -> Any:
        if not self.processes:
            return job.work(*job.args)
        with self._pool_lock:
            if self._pool is None:
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=len(self._threads),
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_worker_process_setup,
                    initargs=(self.nice, self.sched_idle, 1),
                )
            pool = self._pool
        try:
            return pool.submit(job.work, *job.args).result()
        except concurrent.futures.process.BrokenProcessPool:
            with self._pool_lock:  # a worker died (OOM killer): the next job gets a new pool
                if self._pool is pool:
                    self._pool = None
            raise

    def close(self, timeout: float) -> bool:
        """Finish the pending jobs within ``timeout``; what is left then is dropped."""
        deadline = time.monotonic() + timeout
        finished = self.wait_idle(timeout)
        with self._wake:
            self._closed = True
            dropped = len(self._pending)
            self._pending.clear()
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            _stop_pool(pool, finished)
        if dropped:
            logger.warning("outrider agent: %d statistics jobs left unfinished at exit", dropped)
        return finished


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor, finished: bool) -> None:
    """Shut the worker processes down; a job still running at the deadline is killed."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=finished, cancel_futures=True)
    if not finished:
        for process in processes:
            process.kill()
