"""One job at the aggregator: its store, its nodes' accounting, its ranks and windows.

Node agents send items (``agent.aggregation.wire``); the view stores what a
person reads later (each rank's windows, alerts, events) in the job's run
store, keeps the per-node accounting of both tiers, and judges complete job
windows: stragglers, ranks that diverge, the min and max of each metric.
Everything it stores goes to the job's sinks too; ``Out.per_rank`` says
whether an entry is one rank's (W&B and TensorBoard take those; the
aggregator's ``/metrics`` keeps to job-level series, the nodes export the
per-rank ones).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.aggregation import wire
from agent.aggregation.config import AggregationSettings
from agent.aggregation.divergence import DivergenceDetector
from agent.aggregation.extremes import extremes, job_scalars
from agent.aggregation.findings import divergence_alert, node_silent_alert, straggler_alert
from agent.aggregation.ledger import UplinkLedger
from agent.aggregation.stragglers import StragglerDetector
from agent.aggregation.windows import JobWindow, JobWindows
from agent.analysis.summaries import STEP_TIME
from agent.store import runinfo
from agent.store.run_store import RunStore
from probe import protocol
from sinks import schema

#: window-summary figures that become a rank's scalars in the job's W&B run and TensorBoard
WINDOW_FIGURE = "mean"
#: ranks listed as the slowest in run.json and `outrider show`
SLOWEST = 5
#: heartbeats a node may miss before it is called silent (and at least this many seconds)
SILENT_HEARTBEATS = 5
SILENT_SECONDS = 10.0
#: what a node's hello may put in the job's run.json
HELLO_META = ("command", "launcher")


@dataclass
class Out:
    """A stored entry for the sinks, and whose it is."""

    entry: dict[str, Any]
    rank: int = -1
    local_rank: int = -1
    host: str = ""
    per_rank: bool = False


@dataclass
class RankState:
    """What the job view shows of one rank (its latest process)."""

    rank: int
    host: str
    local_rank: int
    restart: int
    world_size: int
    windows: int = 0
    last_step: int | None = None
    step_time_p50: float | None = None
    relative: float | None = None
    individual: float | None = None
    straggler: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "host": self.host,
            "local_rank": self.local_rank,
            "restart": self.restart,
            "windows": self.windows,
            "last_step": self.last_step,
            "step_time_p50": self.step_time_p50,
            "relative_score": self.relative,
            "individual_score": self.individual,
            "straggler": self.straggler,
        }


@dataclass
class NodeState:
    """One node: its uplink streams (one per node-agent process) and its trainers' ledgers."""

    uplinks: dict[str, UplinkLedger] = field(default_factory=dict)  # by node agent id
    streams: dict[str, dict[str, Any]] = field(default_factory=dict)  # probe stream -> summary
    last_seen: float = 0.0

    @property
    def complete(self) -> bool:
        """Every uplink stream of the node said bye."""
        return bool(self.uplinks) and all(u.said_bye for u in self.uplinks.values())

    def accounting(self) -> dict[str, Any]:
        """Both tiers' sums: the node's probe streams, and its uplink to the aggregator."""
        tier1 = {"sent": 0, "received": 0, "dropped": 0, "lost": 0, "not_stored": 0}
        for summary in self.streams.values():
            tier1["sent"] += int(summary.get("sent", 0))
            tier1["received"] += int(summary.get("received", 0))
            tier1["dropped"] += sum((summary.get("dropped") or {}).values())
            tier1["lost"] += int(summary.get("lost", 0))
            tier1["not_stored"] += sum((summary.get("not_stored") or {}).values())
        uplinks = [ledger.summary() for ledger in self.uplinks.values()]
        tier2 = {
            "sent": sum(u["sent"] for u in uplinks),
            "received": sum(u["received"] for u in uplinks),
            "dropped": sum(sum(u["dropped"].values()) for u in uplinks),
            "lost": sum(u["lost"] for u in uplinks),
        }
        return {
            "records": tier1,
            "uplink": tier2,
            "complete": self.complete,
            "streams": list(self.streams.values()),
            "uplinks": uplinks,
        }


class JobView:
    """The aggregator's state of one job; only the aggregator's loop touches it."""

    def __init__(
        self,
        store: RunStore,
        settings: AggregationSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.job = store.run_id
        self.settings = settings
        self.clock = clock
        self.nodes: dict[str, NodeState] = {}
        self.ranks: dict[int, RankState] = {}
        self.windows = JobWindows(max_wait_seconds=settings.window_wait_seconds, clock=clock)
        self.stragglers = StragglerDetector(settings.stragglers)
        self.divergence = DivergenceDetector(settings.divergence)
        self.judged = 0
        self._view_written = -math.inf  # when run.json last took the view
        self._complete = False
        self._silent: set[str] = set()  # nodes the node_silent alert named, until they speak
        self.extremes: dict[str, Any] = {}
        self._restore(store.info.get("job"))
        store.view = self.view

    # -- items from node agents ------------------------------------------------------
    def take(self, envelope: dict[str, Any], item: wire.Item) -> list[Out]:
        """Account for one item and store what it carries; returns what goes to the sinks."""
        node = self.nodes.setdefault(envelope["node"], NodeState())
        node.last_seen = self.clock()
        self._silent.discard(envelope["node"])
        ledger = node.uplinks.get(envelope["agent"])
        if ledger is None:
            ledger = node.uplinks[envelope["agent"]] = UplinkLedger.from_envelope(envelope)
        repeats = ledger.duplicates
        ledger.observe(item)
        if ledger.duplicates != repeats:
            return []  # an item received before (a replayed spool)
        self.store.dirty = True
        body = item.body
        kind = item.kind
        if kind == wire.WINDOW:
            return self._window(body)
        if kind == wire.ALERT:
            entry = self.store.add_alert({**body, "kind": schema.ALERT})
            return [Out(entry, _int(body.get("rank")), host=str(body.get("host", "")))]
        if kind == wire.EVENT:
            return self._event(body)
        if kind == wire.RECORDS:
            return self._records(body)
        if kind == wire.ACCOUNTING:
            for summary in body.get("streams") or []:
                if _is_ledger(summary):
                    node.streams[summary["stream"]] = summary
        if kind == wire.HELLO:
            meta = body.get("meta")
            if isinstance(meta, dict) and "command" not in self.store.info:
                self.store.info.update({k: meta[k] for k in HELLO_META if k in meta})
        return []

    def _window(self, summary: dict[str, Any]) -> list[Out]:
        summary = {**summary, "run": self.job}
        rank = _int(summary.get("rank"))
        host = str(summary.get("host", ""))
        state = self._rank(summary)
        state.windows += 1
        if isinstance(summary.get("last_step"), int):
            state.last_step = summary["last_step"]
        derived = _mapping(summary.get("derived"))
        p50 = derived.get(f"{STEP_TIME}/p50")
        if isinstance(p50, float | int):
            state.step_time_p50 = float(p50)
        self.windows.add(summary)
        stored = self.store.add_local({**summary, "kind": schema.SUMMARY})
        scalars: dict[str, float] = {}
        for name, figures in _mapping(summary.get("metrics")).items():
            value = figures.get(WINDOW_FIGURE) if isinstance(figures, dict) else None
            if isinstance(value, float | int):
                scalars[name] = float(value)
        scalars.update(
            {
                name: float(value)
                for name, value in derived.items()
                if isinstance(value, float | int)
            }
        )
        outs = [Out(stored, rank, state.local_rank, host, per_rank=True)]
        if scalars:
            line = {
                "kind": protocol.SCALARS,
                "rank": rank,
                "host": host,
                "step": summary.get("last_step"),
                "t": summary.get("t_end") or time.time(),
                "metrics": {name: schema.encode_number(v) for name, v in scalars.items()},
            }
            stored_line = self.store.add_local(line)
            outs.append(Out(stored_line, rank, state.local_rank, host, per_rank=True))
        return outs

    def _event(self, body: dict[str, Any]) -> list[Out]:
        kind = body.get("kind")
        record = _mapping(body.get("body"))
        if kind == protocol.CONFIG and isinstance(record.get("params"), dict):
            self.store.info.setdefault("config", {}).update(record["params"])
        elif kind == protocol.HELLO and body.get("rank") == 0 and "trainer" not in self.store.info:
            self.store.info["trainer"] = {k: v for k, v in record.items() if k != "environment"}
            self.store.info["environment"] = runinfo.environment_from_hello(record)
        elif kind == protocol.RUN_END:
            self.store.info.setdefault("node_exits", {})[str(body.get("host"))] = record.get(
                "exit_status"
            )
        if _int(body.get("rank")) >= 0:  # not the launcher's run_end
            self._rank(body)
        entry = self.store.add_local(
            {
                "kind": kind,
                "rank": _int(body.get("rank")),
                "host": body.get("host"),
                "step": body.get("step"),
                "t": body.get("t"),
                **(record if kind == protocol.EVENT else {"body": record}),
            }
        )
        if kind not in (protocol.EVENT, protocol.CONFIG):
            return []
        return [
            Out(
                entry,
                _int(body.get("rank")),
                _int(body.get("local_rank")),
                str(body.get("host", "")),
            )
        ]

    def _records(self, body: dict[str, Any]) -> list[Out]:
        outs = []
        for line in body.get("entries") or []:
            if isinstance(line, dict) and line.get("kind") in (protocol.SCALARS, protocol.EVENT):
                line = {**line, "host": body.get("host")}
                stored = self.store.add_local(line)
                outs.append(
                    Out(
                        stored,
                        _int(line.get("rank")),
                        host=str(body.get("host", "")),
                        per_rank=True,
                    )
                )
        return outs

    def _rank(self, who: dict[str, Any]) -> RankState:
        """The rank's state, replaced when a newer process (a torchrun restart) reports."""
        rank = _int(who.get("rank"))
        restart = _int(who.get("restart"), 0)
        state = self.ranks.get(rank)
        if state is None or restart > state.restart:
            state = self.ranks[rank] = RankState(
                rank,
                str(who.get("host", "")),
                _int(who.get("local_rank")),
                restart,
                _int(who.get("world_size"), 0),
            )
        return state

    # -- once a beat -----------------------------------------------------------------
    def judge(self) -> list[Out]:
        """Judge every job window that is complete (or waited long enough)."""
        outs: list[Out] = []
        for window in self.windows.ready():
            outs.extend(self._judge(window))
        outs.extend(self._silent_nodes())
        return outs

    def _silent_nodes(self) -> list[Out]:
        """A ``node_silent`` alert for each node gone quiet without its bye, once until it
        speaks again."""
        limit = max(SILENT_SECONDS, SILENT_HEARTBEATS * self.settings.heartbeat_seconds)
        now = self.clock()
        outs = []
        for name, node in self.nodes.items():
            quiet = now - node.last_seen
            if name in self._silent or quiet < limit or node.complete:
                continue
            self._silent.add(name)
            alert = self.store.add_alert(node_silent_alert(self.job, name, quiet))
            outs.append(Out(alert, host=name))
        return outs

    def finish(self) -> list[Out]:
        """At the aggregator's close: judge the windows still waiting for a rank."""
        outs: list[Out] = []
        self.windows.max_wait_seconds = 0.0  # nothing more comes: every window waited enough
        for window in self.windows.ready():
            outs.extend(self._judge(window))
        return outs

    def _judge(self, window: JobWindow) -> list[Out]:
        self.judged += 1
        scores = self.stragglers.scores(window)
        for rank, (relative, individual) in scores.items():
            state = self.ranks.get(rank)
            if state is not None:
                state.relative, state.individual = relative, individual
        alerts = [straggler_alert(f) for f in self.stragglers.judge(window)]
        alerts += [divergence_alert(f) for f in self.divergence.judge(window)]
        flagged = self.stragglers.flagged()
        for rank, state in self.ranks.items():
            state.straggler = rank in flagged
        found = extremes(window)
        self.extremes = {name: dataclasses.asdict(e) for name, e in found.items()}
        step = window.step
        outs = []
        for alert in alerts:
            outs.append(
                Out(
                    self.store.add_alert(alert),
                    _int(alert.get("rank")),
                    host=str(alert.get("host", "")),
                )
            )
        figures = job_scalars(
            window, scores, threshold=self.settings.stragglers.threshold, found=found
        )
        if figures:
            line = {
                "kind": protocol.SCALARS,
                "step": step,
                "metrics": {name: schema.encode_number(v) for name, v in figures.items()},
            }
            outs.append(Out(self.store.add_local(line)))
        return outs

    # -- the view --------------------------------------------------------------------
    def view_due(self, now: float) -> bool:
        """Whether run.json should take the view now: once a second for a small job, less
        often for a big one (a view of 8,000 ranks is a megabyte), at once when the last
        node said bye, and every beat while the store is failing (it checks its files)."""
        store = self.store
        if store.failure is not None:
            return True
        if not store.dirty:
            return False
        complete = self.all_said_bye()
        if complete != self._complete:
            self._complete = complete
            return True
        return now - self._view_written >= 1.0 + len(self.ranks) / 1000.0

    def wrote_view(self, now: float) -> None:
        self._view_written = now

    def all_said_bye(self) -> bool:
        return bool(self.nodes) and all(node.complete for node in self.nodes.values())

    def view(self) -> dict[str, Any]:
        """run.json's job keys: ranks, nodes with both tiers' accounting, the slowest ranks."""
        nodes = {name: node.accounting() for name, node in sorted(self.nodes.items())}
        ranks = [state.as_dict() for _, state in sorted(self.ranks.items())]
        timed = [r for r in ranks if r["step_time_p50"] is not None]
        slowest = sorted(timed, key=lambda r: r["relative_score"] or math.inf)[:SLOWEST]
        records = [n["records"] for n in nodes.values()]
        steps = [r["last_step"] for r in ranks if r["last_step"] is not None]
        view: dict[str, Any] = {
            "job": {
                "nodes": nodes,
                "ranks": ranks,
                "slowest": slowest,
                "stragglers": sorted(r["rank"] for r in ranks if r["straggler"]),
                "extremes": self.extremes,
                "windows_judged": self.judged,
            },
            "records": sum(r["received"] for r in records),
            "dropped": sum(r["dropped"] for r in records),
            "lost": sum(r["lost"] for r in records),
            "last_step": max(steps) if steps else None,
        }
        if self.all_said_bye():
            exits = self.store.info.get("node_exits") or {}
            failed = [status for status in exits.values() if status not in (0, None)]
            view["status"] = "failed" if failed else "finished"
        return view

    def _restore(self, job: Any) -> None:
        """An aggregator restarted on the same runs dir picks its nodes' ledgers back up."""
        if not isinstance(job, dict):
            return
        for name, node in (job.get("nodes") or {}).items():
            state = self.nodes.setdefault(name, NodeState())
            state.last_seen = self.clock()  # silent from now on, not since the epoch
            for summary in node.get("uplinks") or []:
                try:
                    ledger = UplinkLedger(
                        self.job, name, str(summary["agent"]), int(summary["pid"])
                    )
                    ledger.restore(summary)
                except (KeyError, TypeError, ValueError):
                    continue  # a run.json edited by hand
                state.uplinks[ledger.agent] = ledger
            for summary in node.get("streams") or []:
                if _is_ledger(summary):
                    state.streams[summary["stream"]] = summary
        for rank in job.get("ranks") or []:
            try:
                self.ranks[int(rank["rank"])] = RankState(
                    int(rank["rank"]),
                    str(rank["host"]),
                    int(rank["local_rank"]),
                    int(rank["restart"]),
                    0,
                    int(rank.get("windows", 0)),
                    rank.get("last_step"),
                )
            except (KeyError, TypeError, ValueError):
                continue


def _is_ledger(summary: Any) -> bool:
    """Whether ``summary`` is a stream ledger's summary the accounting can add up."""
    if not isinstance(summary, dict) or not isinstance(summary.get("stream"), str):
        return False
    counts = [summary.get(key, 0) for key in ("sent", "received", "lost")]
    for key in ("dropped", "not_stored"):
        held = summary.get(key) or {}
        if not isinstance(held, dict):
            return False
        counts.extend(held.values())
    return all(isinstance(n, int) and not isinstance(n, bool) for n in counts)


def _mapping(value: Any) -> dict[str, Any]:
    """``value`` if it is a dict, else an empty one (a node's item is checked for types
    msgpack can carry, not for the shape of every field)."""
    return value if isinstance(value, dict) else {}


def _int(value: Any, default: int = -1) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
