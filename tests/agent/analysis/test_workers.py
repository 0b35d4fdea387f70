"""The statistics workers: newest job per key wins, costs are counted, exit is bounded."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from agent.analysis.workers import StatsJobs
from tests.helpers import wait_for


def _blocker(jobs: StatsJobs) -> threading.Event:
    """Occupy the single worker until the returned event is set."""
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        release.wait(10)

    jobs.submit("blocker", "hold", hold, lambda _: None)
    assert started.wait(5)
    return release


def test_newest_pending_job_per_key_wins_and_the_rest_are_counted() -> None:
    """Three jobs queued for one stream behind a busy worker: only the last runs."""
    jobs = StatsJobs(threads=1)
    release = _blocker(jobs)
    ran: list[int] = []
    for value in (1, 2, 3):
        jobs.submit("features/h", "effective_rank", lambda v=value: v, ran.append)
    jobs.submit("features/other", "effective_rank", lambda: 10, ran.append)
    assert jobs.pending() == 2
    release.set()
    assert jobs.wait_idle(5)
    assert ran == [3, 10]
    figures = jobs.figures()["effective_rank"]
    assert figures.count == 2
    assert figures.superseded == 2
    jobs.close(1)


def test_a_failing_job_is_counted_and_the_worker_keeps_going() -> None:
    """An exception in a statistic ends that job only."""
    jobs = StatsJobs(threads=1)
    results: list[str] = []

    def boom() -> str:
        raise RuntimeError("bad matrix")

    jobs.submit("a", "tsne", boom, results.append)
    jobs.submit("b", "tsne", lambda: "ok", results.append)
    assert jobs.wait_idle(5)
    assert results == ["ok"]
    assert jobs.figures()["tsne"].failed == 1
    assert jobs.figures()["tsne"].count == 2
    jobs.close(1)


def test_durations_come_from_the_injected_clock() -> None:
    """Each job's time is measured around the work, with the given clock."""
    ticks = iter([10.0, 12.5, 20.0, 20.5])
    lock = threading.Lock()

    def clock() -> float:
        with lock:
            return next(ticks)

    jobs = StatsJobs(threads=1, clock=clock)
    jobs.submit("a", "pca", lambda: None, lambda _: None)
    assert jobs.wait_idle(5)
    jobs.submit("b", "pca", lambda: None, lambda _: None)
    assert jobs.wait_idle(5)
    figures = jobs.figures()["pca"]
    assert figures.seconds_sum == pytest.approx(3.0)
    assert figures.seconds_max == pytest.approx(2.5)
    assert figures.last_seconds == pytest.approx(0.5)
    jobs.close(1)


def test_close_is_bounded_by_a_hung_job_and_drops_the_rest() -> None:
    """A statistic that never returns cannot hold the agent's exit."""
    jobs = StatsJobs(threads=1)
    release = _blocker(jobs)
    jobs.submit("later", "tsne", lambda: None, lambda _: None)
    started = time.monotonic()
    assert jobs.close(0.3) is False
    assert time.monotonic() - started < 2.0
    jobs.submit("after-close", "tsne", lambda: None, lambda _: None)
    assert jobs.pending() == 0
    release.set()


def test_zero_threads_is_a_clear_error() -> None:
    """A config asking for no workers is refused with the number it got."""
    with pytest.raises(ValueError, match="got 0"):
        StatsJobs(threads=0)


def test_a_key_never_runs_twice_at_once() -> None:
    """With two workers, a key's next job waits for its running one (stateful maps)."""
    jobs = StatsJobs(threads=2)
    started, release = threading.Event(), threading.Event()
    order: list[str] = []

    def first() -> str:
        started.set()
        release.wait(10)
        return "first"

    jobs.submit("map", "tsne", first, order.append)
    assert started.wait(5)
    jobs.submit("map", "tsne", lambda: "second", order.append)
    jobs.submit("other", "tsne", lambda: "other", order.append)
    deadline = time.monotonic() + 5
    while "other" not in order and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["other"]
    assert jobs.pending() == 1
    release.set()
    assert jobs.wait_idle(5)
    assert order == ["other", "first", "second"]
    jobs.close(1)


def _whoami(nice_before: int) -> tuple[int, int, int]:
    """Runs in a worker process: its pid, niceness increment and scheduling policy."""
    return os.getpid(), os.getpriority(os.PRIO_PROCESS, 0) - nice_before, os.sched_getscheduler(0)


def _crash() -> None:
    os._exit(3)  # a worker process killed mid-job (the OOM killer, a segfault)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux's")
def test_process_jobs_run_in_a_lower_priority_process_that_is_replaced_when_it_dies() -> None:
    """processes=True: jobs run outside the agent's interpreter; a dead worker costs one job."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    jobs = StatsJobs(threads=1, nice=3, idle=True, processes=True)
    seen: list[tuple[int, int, int]] = []
    jobs.submit("a", "whoami", _whoami, seen.append, (base,))
    assert jobs.wait_idle(60)
    [(pid, raised, policy)] = seen
    assert pid != os.getpid()
    assert raised == 3 and policy == os.SCHED_IDLE
    jobs.submit("b", "crash", _crash, seen.append)
    assert jobs.wait_idle(60)
    assert jobs.figures()["crash"].failed == 1
    jobs.submit("c", "whoami", _whoami, seen.append, (base,))
    assert jobs.wait_idle(60)
    assert len(seen) == 2 and seen[1][0] not in (pid, os.getpid())
    assert jobs.close(10)


def _import_and_tell(module: str) -> tuple[int, bool]:
    """Import ``module`` in the worker; returns the worker's pid and whether it was there."""
    import importlib

    there = module in sys.modules
    importlib.import_module(module)
    return os.getpid(), there


def test_a_job_alone_runs_in_a_process_of_its_own_and_takes_its_imports_with_it() -> None:
    """alone=True: the job gets a fresh process, the shared worker is stopped first, and
    what the job imported is not resident in the worker the next ordinary job gets."""
    import psutil

    jobs = StatsJobs(threads=1, processes=True)
    seen: list[tuple[int, bool]] = []
    jobs.submit("a", "ordinary", _import_and_tell, seen.append, ("colorsys",))
    assert jobs.wait_idle(60)
    jobs.submit("b", "heavy", _import_and_tell, seen.append, ("wave",), alone=True)
    assert jobs.wait_idle(60)
    jobs.submit("c", "ordinary", _import_and_tell, seen.append, ("wave",))
    assert jobs.wait_idle(60)
    [(shared, _), (alone, _), (fresh, wave_was_there)] = seen
    assert len({shared, alone, fresh, os.getpid()}) == 4
    assert not psutil.pid_exists(alone) and not psutil.pid_exists(shared)
    assert wave_was_there is False
    assert jobs.figures()["heavy"].count == 1
    assert jobs.close(10)


def test_a_job_alone_without_worker_processes_runs_like_any_other() -> None:
    """processes=False: alone has no process to run in, so the job runs on the worker thread."""
    jobs = StatsJobs(threads=1)
    seen: list[int] = []
    jobs.submit("a", "heavy", os.getpid, seen.append, alone=True)
    assert jobs.wait_idle(10)
    assert seen == [os.getpid()]
    jobs.close(1)


def _start_then_sleep(started: str, seconds: float) -> None:
    Path(started).touch()
    time.sleep(seconds)


def test_a_process_job_cut_off_at_exit_is_said_to_be_stopped_not_failed(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A job still running in its worker process when close() runs out of time: the process
    is killed, and the log says the exit timeout stopped it (not a BrokenProcessPool)."""
    jobs = StatsJobs(threads=1, processes=True)
    jobs.submit("warm", "whoami", _whoami, lambda _: None, (os.getpriority(os.PRIO_PROCESS, 0),))
    assert jobs.wait_idle(60)  # the worker process is up
    started_file = tmp_path / "started"
    jobs.submit(
        "dashboard/run", "dashboard", _start_then_sleep, lambda _: None, (str(started_file), 30.0)
    )
    wait_for(started_file.exists, 30, "the job running in its worker process")
    with caplog.at_level("WARNING", logger="outrider.agent"):
        started = time.monotonic()
        assert jobs.close(0.5) is False
        assert time.monotonic() - started < 10.0
        wait_for(lambda: "dashboard was still running" in caplog.text, 10, "the exit message")
    assert "BrokenProcessPool" not in caplog.text


def _burn(seconds: float) -> float:
    """Use ``seconds`` of CPU; returns when this job started (perf_counter)."""
    started = time.perf_counter()
    cpu = time.thread_time()
    while time.thread_time() - cpu < seconds:
        pass
    return started


def test_cpu_share_spaces_a_kind_of_job_by_what_it_cost_and_holds_no_other_kind() -> None:
    """cpu_share=0.2: a t-SNE that used 0.1 CPU-s lets the next start 0.5 s after it began;
    a cheap job of another kind queued behind it runs at once; close lifts the budget."""
    jobs = StatsJobs(threads=1, cpu_share=0.2)
    starts: dict[str, float] = {}
    jobs.submit("map/a", "tsne", _burn, lambda t: starts.setdefault("first", t), (0.1,))
    assert jobs.wait_idle(5)
    jobs.submit("map/a", "tsne", _burn, lambda t: starts.setdefault("second", t), (0.1,))
    jobs.submit("rank/a", "representation", _burn, lambda t: starts.setdefault("rank", t), (0.0,))
    assert jobs.wait_idle(5)
    assert starts["second"] - starts["first"] >= 0.1 / 0.2 - 0.01
    assert starts["rank"] < starts["second"]  # the other kind was not held behind the rest
    figures = jobs.figures()["tsne"]
    assert figures.count == 2
    assert figures.cpu_seconds_sum >= 0.2
    # At close the trainer is done: the last job of a resting kind (held until 0.5 s after
    # the second began) runs at once.
    jobs.submit("map/a", "tsne", _burn, lambda t: starts.setdefault("last", t), (0.0,))
    assert jobs.close(2.0)
    assert starts["last"] - starts["second"] < 0.1 / 0.2


def test_cpu_share_out_of_range_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="cpu_share"):
        StatsJobs(cpu_share=1.5)


def test_a_costly_kind_waits_for_its_budget_before_its_first_job() -> None:
    """cost_hint: the first t-SNE (hint 0.05 CPU-s at a 0.2 share) waits 0.25 s from the
    workers' start, as if one had just run; a kind without a hint starts at once."""
    jobs = StatsJobs(threads=1, cpu_share=0.2)
    created = time.perf_counter()
    starts: dict[str, float] = {}
    jobs.submit(
        "map/a", "tsne", _burn, lambda t: starts.setdefault("tsne", t), (0.0,), cost_hint=0.05
    )
    jobs.submit("rank/a", "representation", _burn, lambda t: starts.setdefault("rank", t), (0.0,))
    assert jobs.wait_idle(5)
    assert starts["rank"] < starts["tsne"]
    assert starts["tsne"] - created >= 0.05 / 0.2 - 0.01
    jobs.close(1)
