"""Rules on a run's events and the clock: ``stalled``, ``run_died``, ``probe_drops``, ``event``.

They watch whether the trainer and the telemetry path are alive (records
arriving, a bye before the process goes, the probe's drop counters) and pass
the sinks' own alarms through the engine's cooldowns and destinations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import pydantic

from agent.alerts.rules.base import (
    PROCESS_GONE,
    TABLE_LIMIT,
    Context,
    Rule,
    RuleSpec,
    drop_run,
    finite_number,
    integer,
)
from probe import protocol


class StalledSpec(RuleSpec):
    type: Literal["stalled"]
    after_seconds: float = pydantic.Field(default=300.0, gt=0)

    default_message: ClassVar[str] = (
        "{name}: no record from run {run} rank {rank} for {value:.0f} s"
    )


class StalledRule(Rule[StalledSpec]):
    """No trainer record for ``after_seconds`` from a rank that has not said bye."""

    oneshot = False

    def __init__(self, name: str, spec: StalledSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self._quiet_since: dict[tuple[str, int], float] = {}  # rank -> last record of its stall

    def on_tick(self, ctx: Context, now: float) -> None:
        after = self.spec.after_seconds
        for key, info in list(ctx.ranks.items()):
            run, rank = key
            if rank < 0 or info.said_bye or info.last_record is None:
                continue
            quiet = now - info.last_record
            since = self._quiet_since.get(key)
            if since is not None and since != info.last_record:
                ctx.report(self, run, rank, "", None, False)  # records came between two ticks
            if quiet >= after:
                self._quiet_since[key] = info.last_record
            else:
                self._quiet_since.pop(key, None)
            ctx.report(self, run, rank, "", None, quiet >= after, quiet, after)

    def forget(self, run: str, rank: int | None) -> None:
        drop_run(self._quiet_since, run, rank)


class RunDiedSpec(RuleSpec):
    type: Literal["run_died"]
    grace_seconds: float = pydantic.Field(default=5.0, ge=0)

    default_message: ClassVar[str] = (
        "{name}: run {run} rank {rank} ended without a bye ({reason}, exit status "
        "{exit_status}, pid {pid})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "reason": PROCESS_GONE,
        "exit_status": None,
        "pid": None,
    }


class RunDiedRule(Rule[RunDiedSpec]):
    """A trainer gone (its pid vanished, or run_end with a failure) without saying bye."""

    def __init__(self, name: str, spec: RunDiedSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self._pending: dict[tuple[str, int], tuple[float, int | None]] = {}

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        if kind == PROCESS_GONE:
            pid = integer(attrs.get("pid"))
            if rank < 0 and pid is not None:
                for (owner_run, owner_rank), owner in ctx.ranks.items():
                    if owner_run == run and owner.pid == pid and owner_rank >= 0:
                        rank = owner_rank
                        break
            gone = ctx.ranks.get((run, rank))
            if (gone is None or not gone.said_bye) and len(self._pending) < TABLE_LIMIT:
                self._pending[(run, rank)] = (ctx.now() + self.spec.grace_seconds, pid)
        elif kind in (protocol.BYE, protocol.HELLO):
            self._pending.pop((run, rank), None)
            if kind == protocol.BYE:
                self._pending.pop((run, -1), None)
        elif kind == protocol.RUN_END:
            self.forget(run, None)
            status = attrs.get("exit_status")
            if not _failed(status):
                return
            if rank >= 0:
                ended = ctx.ranks.get((run, rank))
                said_bye = ended is not None and ended.said_bye
            else:
                infos = [i for (r, k), i in ctx.ranks.items() if r == run and k >= 0]
                said_bye = bool(infos) and all(i.said_bye for i in infos)
            if not said_bye:
                value = finite_number(status)
                extra = {"reason": protocol.RUN_END, "exit_status": status, "pid": None}
                ctx.report(self, run, rank, "", None, True, value, None, extra)

    def on_tick(self, ctx: Context, now: float) -> None:
        for key, (deadline, pid) in list(self._pending.items()):
            if now < deadline:
                continue
            del self._pending[key]
            info = ctx.ranks.get(key)
            if info is not None and info.said_bye:
                continue
            extra = {"reason": PROCESS_GONE, "exit_status": None, "pid": pid}
            ctx.report(self, key[0], key[1], "", None, True, None, None, extra)

    def forget(self, run: str, rank: int | None) -> None:
        drop_run(self._pending, run, rank)


def _failed(status: Any) -> bool:
    """A run_end exit status that says the trainer failed (None: unknown, not a failure)."""
    if status is None or isinstance(status, bool):
        return bool(status)
    if isinstance(status, int | float):
        return status != 0
    try:
        return int(str(status)) != 0
    except ValueError:
        return str(status).strip().lower() not in ("", "ok", "success", "0")


class ProbeDropsSpec(RuleSpec):
    type: Literal["probe_drops"]

    default_message: ClassVar[str] = (
        "{name}: the probe of run {run} rank {rank} dropped records: {reasons}"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "reasons": "queue_full +1",
        "increase": {},
        "total": {},
    }


class ProbeDropsRule(Rule[ProbeDropsSpec]):
    """A probe's cumulative drop counters went up since its previous report."""

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        dropped = attrs.get("dropped")
        if kind != protocol.PROBE_STATS or not isinstance(dropped, Mapping):
            return
        seen = ctx.state(self, run, rank, "", dict[str, float])
        if seen is None:
            return
        increase: dict[str, float] = {}
        for reason, raw in dropped.items():
            count = finite_number(raw)
            if count is None:
                continue
            reason = str(reason)
            before = seen.get(reason, 0.0)
            if count > before:
                increase[reason] = count - before
            if reason in seen or len(seen) < 64:
                seen[reason] = count  # a lower count is a restarted probe: the new baseline
        if increase:
            reasons = ", ".join(f"{r} +{n:g}" for r, n in sorted(increase.items()))
            extra = {"reasons": reasons, "increase": increase, "total": dict(seen)}
            ctx.report(self, run, rank, "", None, True, sum(increase.values()), 0.0, extra)


class EventSpec(RuleSpec):
    type: Literal["event"]
    event: str
    key_attr: str | None = None

    default_message: ClassVar[str] = "{name}: {detail} (run {run})"
    extra_fields: ClassVar[Mapping[str, object]] = {
        "event": "sink_failed",
        "source": "wandb",
        "detail": "detail",
    }


class EventRule(Rule[EventSpec]):
    """Passes an event through (a sink's own alert), with cooldown and destinations."""

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        spec = self.spec
        if kind != spec.event:
            return
        source = str(attrs.get(spec.key_attr, "")) if spec.key_attr else ""
        detail = str(attrs.get("message", "") or kind)[:2000]
        extra = {"event": kind, "source": source, "detail": detail}
        ctx.report(self, run, rank, kind, None, True, None, None, extra, key=source)
