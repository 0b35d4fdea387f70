"""The agent's brain: statistics, summaries, system samples and alerts, off the receive thread.

The receive loop hands over each burst's stored entries (a deque append) and
takes back what the analysis made: derived scalars, summaries, images,
system samples and fired alerts, which it stores and fans out like any other
record. Everything here runs on one analysis thread plus the statistics
workers (``agent/analysis/workers.py``), below the agent's own priority; the inbox is
bounded, so a flood of input costs statistics (counted), never the run store.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.alerts.rules import PROCESS_GONE, RECORD
from agent.analysis import tasks
from agent.analysis.checkpoints import (
    CHECKPOINT_FAILED,
    CHECKPOINT_SKIPPED,
    CHECKPOINT_VERIFIED,
    CheckpointChecks,
)
from agent.analysis.features import FeatureStreams
from agent.analysis.messages import (
    CheckpointChecked,
    CheckpointSaved,
    Close,
    DashboardDrawn,
    Derived,
    FeatureBatch,
    FeatureMapDrawn,
    FeatureStatistics,
    InboxItem,
    JobResult,
    SinkAlarm,
    SystemSample,
)
from agent.analysis.workers import StatsJobs
from agent.config import AgentConfig
from probe import protocol
from probe.checkpoint import CHECKPOINT_EVENT
from probe.identity import host_name
from sinks import schema
from sinks.health import ActiveAlert, AnalysisHealth, FiredAlert
from sinks.schema import TRAINER_KINDS, Batch

__all__ = ["Analysis", "Derived"]

logger = logging.getLogger("outrider.agent")

INBOX_LIMIT = 50_000  # entries waiting for the analysis thread (~50 MB); older batches dropped
#: the analysis thread wakes once a tick, not on every stored burst: each wake-up costs CPU
#: that, on a machine the trainer keeps busy, comes out of its steps. It works through its
#: inbox then, right after the system sample (which wakes it), so both share one wake-up.
TICK_SECONDS = 1.0
#: a wake-up this far into a tick (the system sample's) does the tick's work early
EARLY_TICK = 0.5
#: with a system sampler its sample sets the pace; the thread's own timer waits this many
#: ticks, a fallback that never fires just before a sample
FALLBACK_TICKS = 1.5
#: ... and the inbox is worked through at once when this many entries wait (a flood: keep
#: up, within the GIL share)
WAKE_ENTRIES = 5_000
#: the kinds that end a stream or a run: a batch of only these does not open a run again
_ENDING = frozenset((protocol.BYE, protocol.RUN_END))
#: how long a run's end waits for the statistics of its last feature batches, so that
#: the rules judge them (a collapse seen in the last batch) before the run is closed
END_WAIT_SECONDS = 15.0
SLICE_SECONDS = 0.005  # analysis work between two pauses (about the interpreter's switch interval)


_FLOAT = frozenset((float,))


def _floats(metrics: Mapping[str, Any]) -> Mapping[str, float]:
    """Stored scalars hold NaN/Infinity as strings: numbers again for the statistics."""
    if _FLOAT.issuperset(map(type, metrics.values())):
        return metrics  # the common case, read only from here on
    values: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                continue
        if isinstance(value, int | float) and not isinstance(value, bool):
            values[name] = float(value)
    return values


class Analysis:
    """Owns the analysis thread, the statistics workers, the system sampler and the alerts."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        host: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_output: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.on_output = on_output  # called on this thread when ``take`` has something
        self.host = host or host_name()
        self.clock = clock
        self.wall_clock = wall_clock
        from agent.alerts import engine as alert_engine
        from agent.analysis.summaries import Summaries
        from agent.system.sampler import SystemSampler

        settings = config.stats
        self.summaries = Summaries(window_steps=settings.window_steps)
        self.jobs = StatsJobs(
            threads=settings.threads,
            nice=settings.nice,
            idle=settings.idle,
            processes=settings.processes,
            cpu_share=settings.cpu_share,
        )
        self.alerts = (
            alert_engine.AlertEngine.from_config(config.alerts, clock=clock)
            if config.alerts.enabled
            else None
        )
        self._inbox: collections.deque[InboxItem] = collections.deque()
        self._outbox: collections.deque[Derived] = collections.deque()
        self._results: collections.deque[JobResult] = collections.deque()
        self._wake = threading.Event()
        self.inbox_dropped = 0
        self._inbox_entries = 0  # entries of the batches in the inbox
        self._inbox_lock = threading.Lock()
        # the alert engine's figures, as last published (None until it first reports)
        self._alert_engine: dict[str, Any] | None = None
        self._alerts_active: tuple[ActiveAlert, ...] | None = None
        self._alerts_fired: tuple[FiredAlert, ...] | None = None
        self._pids: dict[int, tuple[str, int]] = {}  # local trainer pid -> (run, rank)
        self._open_runs: dict[str, Path] = {}
        # streams of each open run that have not said bye: the last bye ends the run here
        self._live_streams: dict[str, set[str]] = {}
        # runs that ended while their feature statistics were still being computed:
        # run -> (deadline, the run_end's (rank, attrs), or None when every stream said bye)
        self._ending: dict[str, tuple[float, tuple[int, dict[str, Any]] | None]] = {}
        self._close_deadline = -math.inf  # set by close()
        # results arrive on worker threads; taken at the next wake-up (a tick at most)
        self.features = FeatureStreams(settings, self.jobs, self._results.append)
        self.checkpoints = CheckpointChecks(self._results.append)
        self._last_dashboard: dict[str, float] = {}
        self._last_step: dict[str, int] = {}
        self.sampler = (
            SystemSampler(
                interval=config.system.interval,
                pids=self._local_pids,
                emit=self._on_system,
                host=self.host,
            )
            if config.system.enabled
            else None
        )
        self._thread = threading.Thread(target=self._run, name="outrider-analysis", daemon=True)

    # -- the receive loop's side ---------------------------------------------------------
    def start(self) -> None:
        self._thread.start()
        if self.config.stats.enabled:
            self.jobs.warm_up(self._job_modules())
        if self.sampler is not None:
            self.sampler.start()

    def wait_warm(self, timeout: float) -> bool:
        """Wait until the statistics workers have started, at most ``timeout``."""
        return self.jobs.wait_warm(timeout)

    def _job_modules(self) -> tuple[str, ...]:
        """What the workers import as the agent starts: the job functions' module (unpickling
        a job imports it) and numpy, for the first features batch.

        matplotlib and openTSNE (about a second of CPU more) are left to the first
        dashboard and the first t-SNE map, minutes into the run (dashboard_seconds,
        cpu_share): imported here they competed with the trainer's own start-up and
        spilled into its first steps.
        """
        return (tasks.__name__, "agent.analysis.representation")  # the jobs, then numpy

    def submit(self, batches: Iterable[Batch]) -> None:
        """Hand over stored entries (called after the store has written them)."""
        with self._inbox_lock:
            for batch in batches:
                self._inbox_entries += len(batch.entries)
                self._inbox.append(batch)
            if self._inbox_entries > INBOX_LIMIT:
                kept: list[InboxItem] = []
                while self._inbox_entries > INBOX_LIMIT and self._inbox:
                    item = self._inbox.popleft()
                    if isinstance(item, Batch):
                        self._inbox_entries -= len(item.entries)
                        self.inbox_dropped += 1
                    else:
                        kept.append(item)  # system samples and sink alerts stay
                self._inbox.extendleft(reversed(kept))
            flood = self._inbox_entries >= WAKE_ENTRIES
        if flood:
            self._wake.set()

    def sink_alert(self, alert: SinkAlarm) -> None:
        """A sink's own alert (sink_failed, series cap): through the rules' cooldowns."""
        self._inbox.append(alert)
        self._wake.set()

    def take(self) -> list[Derived]:
        taken = []
        while self._outbox:
            taken.append(self._outbox.popleft())
        return taken

    def stats(self) -> AnalysisHealth:
        """Job costs, active alerts and fired counts, for /metrics (safe from any thread)."""
        return AnalysisHealth(
            stat_jobs=self.jobs.figures(),
            dropped_batches=self.inbox_dropped,
            alert_engine=self._alert_engine,
            alerts_active=self._alerts_active,
            alerts_fired=self._alerts_fired,
        )

    def close(self, timeout: float) -> None:
        """Finish what is queued (final windows, dashboards) within ``timeout``."""
        deadline = self.clock() + timeout
        # half of it for the statistics of the last feature batches, so the rules see them
        self._close_deadline = self.clock() + min(END_WAIT_SECONDS, timeout / 2)
        if self.sampler is not None:
            self.sampler.close(min(2.0, timeout))
        self._inbox.append(Close())
        self._wake.set()
        self._thread.join(max(0.0, deadline - self.clock()))
        self.jobs.close(max(0.0, deadline - self.clock()))
        self.checkpoints.close(max(0.0, deadline - self.clock()))
        self._process_results()
        self._publish_alerts()
        if self.alerts is not None:
            self.alerts.close(max(0.0, min(5.0, deadline - self.clock())))
            self._alert_engine = self.alerts.stats()

    # -- the analysis thread ---------------------------------------------------------------
    def _run(self) -> None:
        last_tick = self.clock()
        period = TICK_SECONDS * (FALLBACK_TICKS if self.sampler is not None else 1.0)
        closing = False
        while not closing:
            self._wake.wait(max(0.0, last_tick + period - self.clock()))
            self._wake.clear()
            while self._inbox and not closing:
                closing = self._work_a_slice()
            self._process_results()
            if self._ending:
                self._settle_endings()
            now = self.clock()
            if now - last_tick >= EARLY_TICK * TICK_SECONDS or closing:
                last_tick = now
                self._tick(now)
            if self._outbox and self.on_output is not None:
                self.on_output()

    def _work_a_slice(self) -> bool:
        """Up to SLICE_SECONDS of inbox work, then a pause that keeps this thread's share of
        the interpreter (the GIL) under ``stats.gil_share``: the receive loop, not the
        statistics, decides how fast the agent ingests. True once the close item is seen."""
        started = time.perf_counter()
        deadline = started + SLICE_SECONDS
        closing = False
        while self._inbox and not closing and time.perf_counter() < deadline:
            with self._inbox_lock:
                item = self._inbox.popleft()
                if isinstance(item, Batch):
                    self._inbox_entries -= len(item.entries)
            try:
                if isinstance(item, Close):
                    closing = True
                    self._finish_runs()
                else:
                    self._handle(item)
            except Exception as exc:  # a bug in a statistic must not end the analysis
                what = type(item).__name__
                logger.warning("outrider agent: analysis failed on %s: %r", what, exc)
        busy = time.perf_counter() - started
        share = self.config.stats.gil_share
        if self._inbox and not closing and share < 1.0:
            time.sleep(busy * (1.0 - share) / share)
        return closing

    def _handle(self, item: Batch | SystemSample | SinkAlarm) -> None:
        if isinstance(item, Batch):
            self._batch(item)
        elif isinstance(item, SystemSample):
            self._system(item.entry)
        else:
            self._sink_alert(item)

    def _sink_alert(self, item: SinkAlarm) -> None:
        """Into the rules as the event it names; stored as it is without an alert engine."""
        if self.alerts is None:
            self._outbox.append(Derived(item.run, item.entry))
            return
        alert = item.entry
        attrs = {**(alert.get("attrs") or {}), "message": alert.get("message", "")}
        for run_id in [item.run] if item.run else list(self._open_runs) or [""]:
            self.alerts.observe_event(run_id, -1, item.event, attrs)

    def _batch(self, batch: Batch) -> None:
        source = batch.source
        run, rank = source.run, source.rank
        run_dir = Path(batch.run_dir)
        opens = any(entry.get("kind") not in _ENDING for entry in batch.entries)
        if opens and run in self._ending:
            self._settle_endings(force=run)  # a restarted trainer: the old end comes first
        if run not in self._open_runs and opens:
            self._open_runs[run] = run_dir
            # The first dashboard comes one interval in, when there is a curve to draw;
            # drawing one at the start would cost the trainer CPU for an empty picture.
            self._last_dashboard.setdefault(run, self.clock())
        engine = self.alerts
        statistics = self.config.stats.enabled
        trainer_record = False
        said_bye = False
        live = self._live_streams.setdefault(run, set())
        for entry in batch.entries:
            kind = entry.get("kind")
            if kind == protocol.BYE:
                live.discard(entry.get("stream", source.stream))
                said_bye = True
            elif kind != protocol.RUN_END:
                live.add(entry.get("stream", source.stream))
            if kind in TRAINER_KINDS:
                trainer_record = True
            if kind == protocol.SCALARS:
                step = entry.get("step")
                if isinstance(step, int) and step > self._last_step.get(run, -1):
                    self._last_step[run] = step
                metrics = _floats(entry.get("metrics") or {})
                if statistics:
                    self.summaries.observe(run, rank, entry.get("step"), entry["t"], metrics)
                if engine is not None:
                    engine.observe(run, rank, entry.get("step"), entry["t"], metrics)
            elif kind == protocol.TENSOR and entry.get("as") == "features" and statistics:
                self.features.submit(
                    FeatureBatch(run, rank, str(entry["name"]), entry.get("step"), run_dir, entry)
                )
            elif kind == protocol.EVENT:
                self.summaries.observe_event(run, rank, entry.get("step"), str(entry.get("name")))
                if entry.get("name") == CHECKPOINT_EVENT:
                    self._checkpoint_saved(run, rank, entry, local=source.host == self.host)
            elif kind == protocol.HELLO:
                if source.host == self.host and source.pid > 0:
                    self._pids[source.pid] = (run, rank)
                if engine is not None:
                    engine.observe_event(run, rank, protocol.HELLO, {"pid": source.pid})
            elif kind == protocol.PROBE_STATS and engine is not None:
                engine.observe_event(
                    run, rank, protocol.PROBE_STATS, {"dropped": entry.get("dropped")}
                )
            elif kind == protocol.BYE:
                self._pids.pop(source.pid, None)
                if engine is not None:
                    engine.observe_event(run, rank, protocol.BYE, {})
            elif kind == protocol.RUN_END:
                self._request_end(run, (rank, {"exit_status": entry.get("exit_status")}))
        if trainer_record and engine is not None:
            engine.observe_event(run, rank, RECORD, {})
        if said_bye and not self._live_streams.get(run):
            self._request_end(run, None)  # every stream has finished: it is over here

    def _request_end(self, run: str, run_end: tuple[int, dict[str, Any]] | None) -> None:
        """End ``run`` now, or once the statistics of its feature batches are back (at most
        END_WAIT_SECONDS): the rules judge those before the run is forgotten."""
        pending = self._ending.get(run)
        if pending is not None:
            self._ending[run] = (pending[0], run_end or pending[1])
            return
        if self.jobs.busy_with(functools.partial(_feature_statistic_of, run=run)):
            self._ending[run] = (self.clock() + END_WAIT_SECONDS, run_end)
            return
        self._finish_end(run, run_end)

    def _settle_endings(self, force: str | None = None) -> None:
        """End the waiting runs whose statistics are back or whose wait ran out (``force``:
        that run at once)."""
        now = self.clock()
        for run, (deadline, run_end) in list(self._ending.items()):
            if (
                run == force
                or now >= deadline
                or not self.jobs.busy_with(functools.partial(_feature_statistic_of, run=run))
            ):
                del self._ending[run]
                self._process_results()
                self._finish_end(run, run_end)

    def _finish_end(self, run: str, run_end: tuple[int, dict[str, Any]] | None) -> None:
        if run_end is not None and self.alerts is not None:
            rank, attrs = run_end
            self.alerts.observe_event(run, rank, protocol.RUN_END, attrs)
        self._end_run(run)

    def _process_results(self) -> None:
        while self._results:
            result = self._results.popleft()
            if isinstance(result, FeatureStatistics):
                name = result.batch.name
                metrics = {f"features/{name}/{key}": value for key, value in result.metrics.items()}
                self._derive(result.batch.run, result.batch.rank, result.batch.step, metrics)
            elif isinstance(result, CheckpointChecked):
                self._checkpoint_checked(result)
            elif isinstance(result, FeatureMapDrawn):
                batch = result.batch
                name = f"features/{batch.name}/{result.method}"
                self._image(batch.run, batch.rank, batch.step, name, result.path)
            else:
                self._image(result.run, 0, result.step, "dashboard", result.path)

    def _checkpoint_saved(
        self, run: str, rank: int, entry: Mapping[str, Any], *, local: bool
    ) -> None:
        """A trainer saved a checkpoint: a save for the rules (checkpoint_missing), and, from
        a trainer on this host, a file to check on the checkpoint thread."""
        attrs = entry.get("attrs") or {}
        path, size, step = attrs.get("path"), attrs.get("size"), entry.get("step")
        if not isinstance(path, str) or not path:
            return
        size = size if isinstance(size, int) and not isinstance(size, bool) else None
        step = step if isinstance(step, int) else None
        if self.alerts is not None:
            cadence = {k: attrs.get(k) for k in ("every_steps", "every_seconds")}
            self.alerts.observe_event(
                run, rank, CHECKPOINT_EVENT, {"path": path, "step": step, **cadence}
            )
        if local:
            best = attrs.get("best") is True
            self.checkpoints.submit(CheckpointSaved(run, rank, step, path, size, best))

    def _checkpoint_checked(self, result: CheckpointChecked) -> None:
        """Stored as a ``checkpoint_verified`` (with the sha256), ``checkpoint_skipped``
        or ``checkpoint_failed`` event; a failure also goes to the rules."""
        saved = result.saved
        attrs: dict[str, Any] = {"path": saved.path, "size": saved.size}
        if result.rotated:
            name = CHECKPOINT_SKIPPED
            attrs["reason"] = "deleted by its saver's rotation before the check"
        elif result.problem is None:
            name = CHECKPOINT_VERIFIED
            attrs["sha256"] = result.sha256
            if saved.best:
                attrs["best"] = True
        else:
            name = CHECKPOINT_FAILED
            attrs["problem"] = result.problem
            if self.alerts is not None:
                message = f"step {saved.step}: {result.problem}"
                alert_attrs = {"path": saved.path, "step": saved.step, "message": message}
                self.alerts.observe_event(saved.run, saved.rank, CHECKPOINT_FAILED, alert_attrs)
        entry = {
            "kind": protocol.EVENT,
            "step": saved.step,
            "rank": saved.rank,
            "t": self.wall_clock(),
            "name": name,
            "attrs": attrs,
        }
        self._outbox.append(Derived(saved.run, entry))

    def _derive(self, run: str, rank: int, step: int | None, metrics: dict[str, float]) -> None:
        """Derived scalars: to the store and sinks, and fed back to summaries and alerts."""
        clean = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
        t = self.wall_clock()
        self.summaries.observe(run, rank, step, t, clean, derived=True)
        if self.alerts is not None:
            self.alerts.observe(run, rank, step, t, clean)
        stored = {k: schema.encode_number(v) for k, v in clean.items()}
        entry = {"kind": protocol.SCALARS, "step": step, "rank": rank, "t": t, "metrics": stored}
        self._outbox.append(Derived(run, entry))

    def _image(self, run: str, rank: int, step: int | None, name: str, path: Path) -> None:
        entry = {
            "kind": schema.IMAGE,
            "step": step,
            "rank": rank,
            "t": self.wall_clock(),
            "name": name,
            "path": str(path),
        }
        self._outbox.append(Derived(run, entry))

    # -- system samples ------------------------------------------------------------------------
    def _local_pids(self) -> list[int]:
        return list(self._pids)

    def _on_system(self, entry: dict[str, Any]) -> None:
        """Called on the sampler's thread: the analysis wakes for it (and does its tick)."""
        self._inbox.append(SystemSample(entry))
        self._wake.set()

    def _system(self, entry: dict[str, Any]) -> None:
        """Stored in, and sent for, every running run; between runs nothing is stored, and
        the sample goes only to the sinks that show a host's state between runs (Prometheus),
        so a long-lived node agent exports host and GPU health like a DCGM exporter."""
        for run in self._open_runs:
            self._outbox.append(Derived(run, entry))
        if not self._open_runs:
            self._outbox.append(Derived(None, entry, to_store=False))
        gone = entry.get("gone") or []
        metrics = schema.flatten(entry)
        if self.config.stats.enabled:
            for run in list(self._open_runs):
                self.summaries.observe(run, -1, None, entry.get("t", self.wall_clock()), metrics)
        if self.alerts is None:
            return
        for run in list(self._open_runs):
            self.alerts.observe(run, -1, None, entry.get("t", self.wall_clock()), metrics)
        for pid in gone:
            owner = self._pids.pop(pid, None)
            if owner is not None:
                self.alerts.observe_event(owner[0], owner[1], PROCESS_GONE, {"pid": pid})

    # -- periodic work ------------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        self._take_summaries()
        if self.alerts is not None:
            self.alerts.tick()
            self._publish_alerts()
        every = self.config.stats.dashboard_seconds
        if every > 0 and self.config.stats.enabled:
            for run in list(self._open_runs):
                if now - self._last_dashboard.get(run, -math.inf) >= every:
                    self._dashboard(run, now)

    def _take_summaries(self) -> None:
        for entry in self.summaries.take():
            run = entry.pop("run")
            self._outbox.append(Derived(run, entry))

    def _dashboard(self, run: str, now: float) -> None:
        history = {
            name: (x.copy(), y.copy()) for name, (x, y) in self.summaries.history(run).items()
        }
        if not history:
            return
        self._last_dashboard[run] = now
        step = self._last_step.get(run)
        path = self._open_runs[run] / "images" / "dashboard" / f"{step or 0:08d}.png"
        self.jobs.submit(
            (run, "dashboard"),
            "dashboard",
            tasks.dashboard_job,
            lambda written: self._results.append(DashboardDrawn(run, step, written)),
            (history, path, f"outrider run {run}"),
        )

    def _end_run(self, run: str) -> None:
        """The trainer finished (``run_end``, or every stream said bye): last windows, a final
        dashboard, no more periodic work or system samples. A record that comes later for
        the run (a restarted trainer) opens it again."""
        self._live_streams.pop(run, None)
        self.summaries.close_run(run)
        self._take_summaries()
        if run in self._open_runs:
            if self.config.stats.dashboard_seconds > 0 and self.config.stats.enabled:
                self._dashboard(run, self.clock())
            del self._open_runs[run]

    def _finish_runs(self) -> None:
        """At exit: the statistics of the feature batches taken (within the close budget),
        then every run ended."""
        while self.jobs.busy_with(_any_feature_statistic) and self.clock() < self._close_deadline:
            time.sleep(0.02)
        self._process_results()
        for run in list(self._ending):
            self._settle_endings(force=run)
        for run in list(self._open_runs):
            self._end_run(run)

    def _publish_alerts(self) -> None:
        engine = self.alerts
        if engine is None:
            return
        for alert in engine.take_fired():
            destinations = alert.get("destinations") or []
            run = alert.pop("run", None) or None
            self._outbox.append(
                Derived(
                    run, alert, to_store="store" in destinations, to_sinks="sinks" in destinations
                )
            )
        self._alert_engine = engine.stats()  # state size, refusals, webhook deliveries
        self._alerts_active = tuple(
            ActiveAlert(alert["name"], alert["severity"], alert["run"]) for alert in engine.active()
        )
        self._alerts_fired = tuple(
            FiredAlert(name, severity, count) for (name, severity), count in engine.counts().items()
        )


def _any_feature_statistic(key: Any) -> bool:
    return isinstance(key, tuple) and bool(key) and _feature_statistic_of(key, key[0])


def _feature_statistic_of(key: Any, run: str) -> bool:
    """Whether a statistics job key is a feature batch's statistics for ``run``: its
    ``(run, rank, name)`` or the pair's ``(run, rank, name, "pair")`` (maps and dashboards
    are pictures, which no rule reads)."""
    return (
        isinstance(key, tuple)
        and bool(key)
        and key[0] == run
        and (len(key) == 3 or (len(key) == 4 and key[3] == "pair"))
    )
