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
import contextlib
import dataclasses
import importlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from sinks.health import JobCost
from sinks.ratelimit import RateLimitedLog

logger = logging.getLogger("outrider.agent")


@dataclass
class JobFigures:
    """What one kind of job cost: shown as ``outrider_stat_job_duration_seconds``."""

    count: int = 0
    seconds_sum: float = 0.0
    seconds_max: float = 0.0
    last_seconds: float = 0.0
    cpu_seconds_sum: float = 0.0  # CPU the jobs used (wall time under SCHED_IDLE is longer)
    superseded: int = 0
    failed: int = 0

    def cost(self) -> JobCost:
        """A frozen copy, for the agent's health snapshot."""
        return JobCost(**dataclasses.asdict(self))


@dataclass
class _Job:
    name: str
    work: Callable[..., Any]
    args: tuple[Any, ...]
    done: Callable[[Any], None]
    figures: JobFigures = field(repr=False, default_factory=JobFigures)
    alone: bool = False


def _worker_process_setup(
    nice: int,
    idle: bool,
    blas_threads: int,
    preload: tuple[str, ...] = (),
    lifeline: Connection | None = None,
) -> None:
    """In a statistics worker process: ``nice`` below the agent, the statistics' imports
    (``preload``), then SCHED_IDLE (Linux: only cycles nothing else wants), one BLAS
    thread, deaf to ^C (the agent stops it), and gone when the agent is (``lifeline``).

    A process pool's workers outlive a killed parent: each holds its own end of
    the job queue's pipe, so it never reads end-of-file there. The lifeline is a
    pipe only the agent can write to; a thread blocked on it exits the process
    as soon as the agent is gone, at no cost while it lives.

    The imports come before SCHED_IDLE: under it they would wait for idle
    cycles, which a starting trainer leaves none of, and spill into its first
    training steps.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lifeline is not None:
        threading.Thread(
            target=_exit_with_the_agent, args=(lifeline,), name="outrider-lifeline", daemon=True
        ).start()
    linux = sys.platform.startswith("linux")
    if linux:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + nice))
    for module in preload:
        with contextlib.suppress(Exception):  # the job that needs it fails, and is counted
            importlib.import_module(module)
    if linux and idle:
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    import threadpoolctl

    threadpoolctl.threadpool_limits(limits=blas_threads)


def _exit_with_the_agent(lifeline: Connection) -> None:
    with contextlib.suppress(EOFError, OSError):
        while True:
            lifeline.recv_bytes()  # nothing is ever sent: this returns at end-of-file
    os._exit(0)


def _warm_up_job() -> None:
    """The warm-up job: it only makes the pool start its worker process."""


def _measured(work: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``work(*args)`` and the CPU seconds it used, measured where it runs."""
    started = time.thread_time()
    result = work(*args)
    return result, time.thread_time() - started


class StatsJobs:
    """``threads`` workers over a table of pending jobs, one per key, newest wins.

    With ``processes``, each worker thread runs its jobs in a worker process
    (started by warm_up() or the first job): a statistic in C code that holds Python's GIL
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
        cpu_share: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if threads < 1:
            raise ValueError(f"stats threads must be >= 1, got {threads}")
        if not 0.0 <= cpu_share <= 1.0:
            raise ValueError(f"stats cpu_share must be in [0, 1], got {cpu_share}")
        self.cpu_share = cpu_share
        self.nice = nice
        self.sched_idle = idle
        self.processes = processes
        self.clock = clock
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._alone_pools: set[concurrent.futures.ProcessPoolExecutor] = set()
        self._lifeline: tuple[Connection, Connection] | None = None  # the pool's (read, write)
        self._preload: tuple[str, ...] = ()  # modules each worker process imports at start
        self._warming: list[concurrent.futures.Future[None]] = []
        self._pool_lock = threading.Lock()
        self._pending: collections.OrderedDict[Any, _Job] = collections.OrderedDict()
        self._figures: dict[str, JobFigures] = {}
        self._running_keys: set[Any] = set()
        self._rest_until: dict[str, float] = {}  # job name -> earliest start of the next one
        self._budget_start = clock() if cpu_share > 0 else 0.0
        self._running = 0
        self._closed = False
        self._closing = False
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
        cost_hint: float = 0.0,
        alone: bool = False,
    ) -> None:
        """Queue ``work(*args)``; ``done(result)`` runs on the worker thread. Replaces
        ``key``'s pending job.

        ``cost_hint``: the CPU seconds a job of this kind is expected to take. Under a
        CPU budget, the first one waits as if one had run when the workers started, so
        an expensive kind (t-SNE) does not spend its budget in the run's first seconds.
        ``alone``: run it in a worker process of its own that exits with it (see the
        class docstring); without worker processes it runs like any other job.
        """
        with self._wake:
            if self._closed:
                return
            if self.cpu_share > 0 and cost_hint > 0 and not self._closing:
                self._rest_until.setdefault(name, self._budget_start + cost_hint / self.cpu_share)
            figures = self._figures.setdefault(name, JobFigures())
            previous = self._pending.pop(key, None)
            if previous is not None:
                previous.figures.superseded += 1
            self._pending[key] = _Job(name, work, args, done, figures, alone)
            self._wake.notify()

    def pending(self) -> int:
        with self._wake:
            return len(self._pending)

    def busy_with(self, wanted: Callable[[Any], bool]) -> bool:
        """Whether a job whose key is ``wanted`` is waiting or running."""
        with self._wake:
            return any(wanted(key) for key in (*self._pending, *self._running_keys))

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._pending or self._running:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(min(left, 0.05))
            return True

    def figures(self) -> dict[str, JobCost]:
        """Per job name: count, seconds_sum/max/last, superseded, failed (thread-safe copy)."""
        with self._wake:
            return {name: figures.cost() for name, figures in self._figures.items()}

    def _next_key(self) -> tuple[Any, float | None]:
        """The oldest pending key not being worked on (one job per key at a time) whose kind
        is not resting off its CPU budget; else None and how long until one may be."""
        now = self.clock() if self._rest_until else 0.0
        soonest: float | None = None
        for key, job in self._pending.items():
            if key in self._running_keys:
                continue
            rest = self._rest_until.get(job.name, now) - now
            if rest <= 0:
                return key, None
            soonest = rest if soonest is None else min(soonest, rest)
        return None, soonest

    def _work(self) -> None:
        while True:
            with self._wake:
                key, wait = self._next_key()
                while key is None and not self._closed:
                    self._wake.wait(wait)
                    key, wait = self._next_key()
                if self._closed:
                    return
                job = self._pending.pop(key)
                self._running_keys.add(key)
                self._running += 1
            started = self.clock()
            cpu = 0.0
            try:
                result, cpu = self._call(job)
                job.done(result)
                failed = False
            except Exception as exc:  # a statistic that fails must not end the worker
                failed = True
                if self._closed:  # close() stopped the worker processes at its deadline
                    logger.warning(
                        "outrider agent: statistic %s was still running when the exit "
                        "timeout (stats.close_timeout) ran out, and was stopped",
                        job.name,
                    )
                else:
                    self._complaints.warning(
                        f"job:{job.name}", "outrider agent: statistic %s failed: %r", job.name, exc
                    )
            elapsed = self.clock() - started
            with self._wake:
                self._running -= 1
                self._running_keys.discard(key)
                if self.cpu_share > 0 and not self._closing:
                    # The CPU budget: a kind of job that used c CPU-seconds starts again
                    # no sooner than c / cpu_share after this one started. A slow
                    # statistic runs less often (newest input wins); a cheap one is not held.
                    self._rest_until[job.name] = started + cpu / self.cpu_share
                figures = job.figures
                figures.count += 1
                figures.failed += failed
                figures.cpu_seconds_sum += cpu
                figures.seconds_sum += elapsed
                figures.last_seconds = elapsed
                figures.seconds_max = max(figures.seconds_max, elapsed)
                self._wake.notify_all()

    def warm_up(self, modules: tuple[str, ...]) -> None:
        """Start the worker processes now and import ``modules`` in each, without waiting.

        Starting a worker process (the interpreter, the agent's modules, numpy)
        costs about half a second of CPU: paid before the trainer starts (the agent
        waits for it before it says it is ready), it does not fall on training
        steps. An import that fails here fails again, and is counted, in the job
        that needs it.
        """
        if not self.processes:
            return
        self._preload = tuple(modules)
        pool = self._get_pool()
        self._warming = [pool.submit(_warm_up_job) for _ in self._threads]

    def wait_warm(self, timeout: float) -> bool:
        """Wait until the worker processes started by :meth:`warm_up` are up, at most
        ``timeout``; True when they are (or there is nothing to wait for)."""
        pending = concurrent.futures.wait(self._warming, timeout=timeout).not_done
        return not pending

    def _get_pool(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = self._new_pool(len(self._threads))
            return self._pool

    def _new_pool(self, workers: int) -> concurrent.futures.ProcessPoolExecutor:
        """A pool of ``workers`` processes (started by its first jobs); under ``_pool_lock``."""
        context = multiprocessing.get_context("spawn")
        if self._lifeline is None:
            # Only this process holds the write end: the workers see end-of-file when the
            # agent dies in any way (SIGKILL, the OOM killer) and exit, not linger. (The
            # read end stays open here too: every pool, now or later, hands it to its workers.)
            self._lifeline = context.Pipe(duplex=False)
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=context,
            initializer=_worker_process_setup,
            initargs=(self.nice, self.sched_idle, 1, self._preload, self._lifeline[0]),
        )

    def _call(self, job: _Job) -> tuple[Any, float]:
        if not self.processes:
            return _measured(job.work, *job.args)
        if job.alone:
            return self._call_alone(job)
        pool = self._get_pool()
        try:
            result: tuple[Any, float] = pool.submit(_measured, job.work, *job.args).result()
            return result
        except concurrent.futures.process.BrokenProcessPool:
            with self._pool_lock:  # a worker died (OOM killer): the next job gets a new pool
                if self._pool is pool:
                    self._pool = None
            raise

    def _call_alone(self, job: _Job) -> tuple[Any, float]:
        """``job`` in a process started for it, the shared worker process stopped first (once
        its running jobs are done); the next ordinary job starts a new shared one."""
        with self._pool_lock:
            shared, self._pool = self._pool, None
            if self._closed:
                raise RuntimeError("the statistics workers are closed")
            pool = self._new_pool(1)
            self._alone_pools.add(pool)
        try:
            if shared is not None:
                shared.shutdown(wait=True)
            result: tuple[Any, float] = pool.submit(_measured, job.work, *job.args).result()
            return result
        finally:
            with self._pool_lock:
                self._alone_pools.discard(pool)
            pool.shutdown(wait=True)

    def close(self, timeout: float) -> bool:
        """Finish the pending jobs within ``timeout``; what is left then is dropped."""
        deadline = time.monotonic() + timeout
        with self._wake:  # the trainer is done: the last maps and dashboard need no budget
            self._closing = True
            self._rest_until.clear()
            self._wake.notify_all()
        finished = self.wait_idle(timeout)
        with self._wake:
            self._closed = True
            dropped = len(self._pending)
            self._pending.clear()
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._pool_lock:
            pools = [p for p in (self._pool, *self._alone_pools) if p is not None]
            self._pool = None
        for pool in pools:
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
