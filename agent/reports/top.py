"""What ``outrider top`` shows: the runs going on now, per run and per rank, read from the
run store as the agent writes it.

Each run is followed with ``RunLog.update`` from near the end of its ``metrics.jsonl``
(a long run's history is not what a live view needs), keeping only the metrics shown and
their last points, so memory stays flat however long the run. Ranks, their processes and
whether they said goodbye come from run.json, which the agent rewrites every second; an
aggregator's job view (``jobs/<id>``) gives its ranks, hosts and stragglers in its
``job`` section. Steps/s is a rank's own pace over its last ``RATE_WINDOW`` seconds of
records (trainer time, so a slow agent does not distort it), or over its last two when
they are further apart (a job view's ranks report once a window).

There are no "alert cleared" entries: an alert counts as active for ``ALERT_WINDOW``
seconds after it fired (the built-in rules' cooldown), measured at the run's end for a
run that ended.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agent.store.layout import METRICS, RUN_JSON
from agent.store.runs import list_runs, load_info, resolve
from agent.store.series import RunLog, Series

ALERT_WINDOW = 300.0
#: a running rank with no record for this long is shown as quiet
QUIET_AFTER = 30.0
#: a run still marked running whose files have not changed for this long (its agent was
#: killed) is not shown unless asked for
STALE_AFTER = 3600.0
RATE_WINDOW = 30.0
KEEP_POINTS = 512  # points kept per series (all ranks together)
KEEP_ALERTS = 200
TAIL_BYTES = 8 << 20  # where following a run starts: this far before the end of its lines

LOSS_NAMES = ("loss", "train/loss", "train_loss")
GRAD_NORM_NAMES = ("grad_norm", "train/grad_norm")
#: scalars whose steps give the pace (any rank logs at least one of them every step)
PACE_NAMES = (*LOSS_NAMES, *GRAD_NORM_NAMES, "lr", "step_time_seconds", "tokens_per_second")
GPU_FIELDS = ("util_percent", "memory_used_bytes", "memory_total_bytes")
PROCESS_FIELDS = ("cpu_percent", "rss_bytes")


def shown(name: str) -> bool:
    """The metrics top reads (everything else in the lines is skipped as they are read)."""
    if name in PACE_NAMES:
        return True
    if name.startswith("system/gpu"):
        return name.rsplit("/", 1)[-1] in GPU_FIELDS
    if name.startswith("system/process/"):
        return name.rsplit("/", 1)[-1] in PROCESS_FIELDS
    return False


@dataclass
class FollowedRun:
    """One run followed from its files."""

    name: str
    run_dir: Path
    log: RunLog = field(init=False)
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.log = RunLog(self.run_dir, shown)
        self.log.offset = _tail_offset(self.run_dir / METRICS)

    def refresh(self) -> None:
        # mid-rename or unreadable for a moment: the last good one stands
        with contextlib.suppress(OSError, orjson.JSONDecodeError):
            self.info = load_info(self.run_dir)
        while self.log.update():
            self._trim()

    def _trim(self) -> None:
        for series in self.log.series.values():
            if len(series) > KEEP_POINTS:
                for points in (series.steps, series.times, series.values, series.ranks):
                    del points[:-KEEP_POINTS]
        del self.log.alerts[:-KEEP_ALERTS]
        for kept in (self.log.events, self.log.texts, self.log.images):
            kept.clear()


def _tail_offset(path: Path) -> int:
    """The start of the first whole line in the last ``TAIL_BYTES`` of ``path``."""
    try:
        size = path.stat().st_size
        if size <= TAIL_BYTES:
            return 0
        with open(path, "rb") as file:
            file.seek(size - TAIL_BYTES)
            chunk = file.read(1 << 20)
    except OSError:
        return 0
    newline = chunk.find(b"\n")
    return size - TAIL_BYTES + newline + 1 if newline >= 0 else size


def _last(series: Series | None, rank: int | None = None) -> tuple[float, float] | None:
    """(value, t) of the newest point, of ``rank`` when given."""
    if series is None:
        return None
    for index in range(len(series) - 1, -1, -1):
        if rank is None or series.ranks[index] == rank:
            return series.values[index], series.times[index]
    return None


def _first(log: RunLog, names: tuple[str, ...]) -> Series | None:
    for name in names:
        if name in log.series:
            return log.series[name]
    return None


@dataclass
class Pace:
    """A rank's last step, its steps per second over its last ``RATE_WINDOW`` seconds, the
    time of its newest record and the mean seconds between its recent records."""

    step: int | None = None
    steps_per_second: float | None = None
    newest: float | None = None
    interval: float | None = None

    def quiet(self, age: float) -> bool:
        """Silent for longer than ``QUIET_AFTER`` and three of its usual intervals (a job
        view's ranks speak once a window)."""
        return age > max(QUIET_AFTER, 3 * (self.interval or 0.0))


def pace(log: RunLog, rank: int) -> Pace:
    """How fast ``rank`` goes, from the steps and times of its scalars."""
    points: dict[float, float] = {}  # step -> earliest time seen
    newest: float | None = None
    for name in PACE_NAMES:
        series = log.series.get(name)
        if series is None:
            continue
        for step, t, r in zip(series.steps, series.times, series.ranks, strict=True):
            if r != rank or not math.isfinite(t):
                continue
            newest = t if newest is None else max(newest, t)
            if math.isfinite(step) and (step not in points or t < points[step]):
                points[step] = t
    if not points or newest is None:
        return Pace(newest=newest)
    found = Pace(int(max(points)), newest=newest)
    recent = sorted((t, step) for step, t in points.items() if t >= newest - RATE_WINDOW)
    if len(recent) < 2:
        recent = sorted((t, step) for step, t in points.items())[-2:]  # sparser than the window
    if len(recent) >= 2 and recent[-1][0] > recent[0][0]:
        (t0, s0), (t1, s1) = recent[0], recent[-1]
        found.steps_per_second = (s1 - s0) / (t1 - t0)
        found.interval = (t1 - t0) / (len(recent) - 1)
    return found


@dataclass
class RankView:
    rank: int
    host: str | None = None
    pid: int | None = None
    local_rank: int | None = None
    step: int | None = None
    steps_per_second: float | None = None
    loss: float | None = None
    grad_norm: float | None = None
    gpu: int | None = None
    gpu_util_percent: float | None = None
    gpu_memory_used_bytes: float | None = None
    gpu_memory_total_bytes: float | None = None
    cpu_percent: float | None = None
    rss_bytes: float | None = None
    alerts: list[str] = field(default_factory=list)
    last_record_age_s: float | None = None
    quiet: bool = False
    status: str = "running"


def _alert_label(alert: dict[str, Any]) -> str:
    return f"{alert.get('name')}({alert.get('severity')})"


class Top:
    """The runs of a runs directory (or the named ones), followed as they grow."""

    def __init__(
        self,
        runs_dir: Path,
        focus: list[str] | None = None,
        *,
        alert_window: float = ALERT_WINDOW,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.runs_dir = runs_dir
        self.focus = focus or []
        self.alert_window = alert_window
        self.clock = clock
        self.followed: dict[Path, FollowedRun] = {}

    def select(self) -> list[tuple[str, Path]]:
        """The named runs; else those running now; else the newest one."""
        if self.focus:
            return [(name, self._resolve(name)) for name in self.focus]
        rows = list_runs(self.runs_dir)
        now = self.clock()
        running = []
        for row in rows:
            run_dir = self.runs_dir / str(row["run_id"])
            if row.get("status") == "running" and now - _changed(run_dir) < STALE_AFTER:
                running.append((str(row["run_id"]), run_dir))
        if running or not rows:
            return running
        return [(str(rows[0]["run_id"]), self.runs_dir / str(rows[0]["run_id"]))]

    def _resolve(self, name: str) -> Path:
        return resolve(self.runs_dir, name)

    def refresh(self) -> None:
        """Pick up new runs and the lines appended since the last call."""
        wanted = self.select()
        keep = {run_dir for _, run_dir in wanted}
        for run_dir in [d for d in self.followed if d not in keep]:
            del self.followed[run_dir]
        for name, run_dir in wanted:
            run = self.followed.get(run_dir)
            if run is None:
                run = self.followed[run_dir] = FollowedRun(name, run_dir)
            run.refresh()

    def snapshot(self) -> dict[str, Any]:
        """Everything one frame shows, as plain data (``top --json``)."""
        now = self.clock()
        runs = [self._run(run, now) for run in self.followed.values()]
        return {"time": now, "runs_dir": str(self.runs_dir), "runs": runs}

    def _run(self, run: FollowedRun, now: float) -> dict[str, Any]:
        info, log = run.info, run.log
        status = str(info.get("status") or "?")
        live = status == "running"
        at = now if live else float(info.get("end_time") or now)
        active = [
            a
            for a in log.alerts
            if isinstance(a.get("t"), int | float) and 0 <= at - a["t"] <= self.alert_window
        ]
        ranks = [self._rank(run, view, active, now, live) for view in self._ranks(run)]
        rates = [r.steps_per_second for r in ranks if r.steps_per_second is not None]
        steps = [r.step for r in ranks if r.step is not None]
        losses = [r.loss for r in ranks if r.loss is not None and math.isfinite(r.loss)]
        ages = [r.last_record_age_s for r in ranks if r.last_record_age_s is not None]
        if live and ages and all(r.quiet or r.status == "done" for r in ranks):
            status = f"quiet {min(ages):.0f}s"
        return {
            "run": run.name,
            "dir": str(run.run_dir),
            "status": status,
            "job": isinstance(info.get("job"), dict),
            "start_time": info.get("start_time"),
            "step": max(steps) if steps else None,
            "steps_per_second": min(rates) if rates else None,
            "loss": sum(losses) / len(losses) if losses else None,
            "alerts": sorted({_alert_label(a) for a in active}),
            "alerts_recent": [
                {key: a.get(key) for key in ("name", "severity", "rank", "step", "t", "message")}
                for a in active[-10:]
            ],
            "ranks": [vars(r) for r in ranks],
        }

    def _ranks(self, run: FollowedRun) -> list[RankView]:
        """The run's ranks with who they are: job view ranks, else trainer streams, else the
        ranks seen in the lines."""
        info = run.info
        job = info.get("job")
        views: dict[int, RankView] = {}
        if isinstance(job, dict):
            for entry in job.get("ranks") or []:
                if isinstance(entry, dict) and isinstance(entry.get("rank"), int):
                    view = views[entry["rank"]] = RankView(entry["rank"], entry.get("host"))
                    view.local_rank = entry.get("local_rank")
                    if entry.get("straggler"):
                        view.status = "straggler"
        restarts: dict[int, int] = {}
        streams = [] if isinstance(job, dict) else info.get("streams") or []
        for stream in streams:
            rank = stream.get("rank") if isinstance(stream, dict) else None
            restart = stream.get("restart", 0) if isinstance(stream, dict) else 0
            if not isinstance(rank, int) or rank < 0 or restart < restarts.get(rank, 0):
                continue  # the launcher's stream, or a process a torchrun restart replaced
            restarts[rank] = restart
            view = views[rank] = RankView(rank, stream.get("host"), stream.get("pid"))
            view.local_rank = stream.get("local_rank")
            view.status = "done" if stream.get("complete") else "running"
        for series in run.log.series.values():
            if not series.name.startswith("system/"):
                for rank in set(series.ranks):
                    if rank >= 0:
                        views.setdefault(rank, RankView(rank))
        return [views[rank] for rank in sorted(views)]

    def _rank(
        self, run: FollowedRun, view: RankView, active: list[dict[str, Any]], now: float, live: bool
    ) -> RankView:
        log = run.log
        found = pace(log, view.rank)
        view.step, view.steps_per_second = found.step, found.steps_per_second
        if found.newest is not None:
            view.last_record_age_s = max(0.0, now - found.newest)
            view.quiet = live and found.quiet(view.last_record_age_s)
        loss = _last(_first(log, LOSS_NAMES), view.rank)
        grad = _last(_first(log, GRAD_NORM_NAMES), view.rank)
        view.loss = loss[0] if loss else None
        view.grad_norm = grad[0] if grad else None
        view.gpu = self._gpu_of(log, view)
        if view.gpu is not None:
            for name in GPU_FIELDS:
                point = _last(log.series.get(f"system/gpu{view.gpu}/{name}"))
                setattr(view, f"gpu_{name}", point[0] if point else None)
        if view.pid is not None:
            for name in PROCESS_FIELDS:
                point = _last(log.series.get(f"system/process/{view.pid}/{name}"))
                setattr(view, name, point[0] if point else None)
        view.alerts = sorted({_alert_label(a) for a in active if a.get("rank") == view.rank})
        if view.status == "running":
            if not live:
                view.status = str(run.info.get("status") or "?")
            elif view.quiet:
                view.status = f"quiet {view.last_record_age_s:.0f}s"
        return view

    @staticmethod
    def _gpu_of(log: RunLog, view: RankView) -> int | None:
        """The GPU a rank uses: its local rank's (torchrun's convention), or the only one."""
        gpus = sorted(
            int(name.split("/")[1][3:])
            for name in log.series
            if name.startswith("system/gpu") and name.endswith("/util_percent")
        )
        if not gpus:
            return None
        if view.local_rank is not None and view.local_rank in gpus:
            return view.local_rank
        return gpus[0] if len(gpus) == 1 else None


def _changed(run_dir: Path) -> float:
    """When the run's files last changed (0 when they cannot be read)."""
    newest = 0.0
    for name in (RUN_JSON, METRICS):
        try:
            newest = max(newest, os.stat(run_dir / name).st_mtime)
        except OSError:
            continue
    return newest
