"""``checkpoint_missing``: training goes on, and the run has not saved a good checkpoint for
longer than its cadence allows.

A crash costs the steps since the last checkpoint that loads; a save that
silently stopped (an exception swallowed around it, a condition that no
longer matches the step, a callback lost in a refactor) is found only then.
The expected cadence is what the trainer declares with each save
(``probe.checkpoint.save(..., every_steps=N)`` or ``every_seconds=``), or the
rule's own ``every_steps`` / ``every_seconds`` for runs whose rank 0 reports to
this agent. The rule holds once the run's steps (or its records' arrival
times) are more than ``factor`` times that cadence past the newest save that
did not fail the agent's check; a run that stopped logging is ``stalled``'s,
not this rule's.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, ClassVar, Literal

import pydantic

from agent.alerts.rules.base import (
    TABLE_LIMIT,
    Context,
    RankInfo,
    Rule,
    RuleSpec,
    finite_number,
    integer,
)
from probe import protocol
from probe.checkpoint import CHECKPOINT_EVENT
from sinks.schema import CHECKPOINT_FAILED

__all__ = ["CheckpointMissingRule", "CheckpointMissingSpec"]

SAVES_KEPT = 32  # recent saves remembered per run: enough to find the newest good one


class CheckpointMissingSpec(RuleSpec):
    type: Literal["checkpoint_missing"]
    every_steps: int | None = pydantic.Field(default=None, gt=0)
    every_seconds: float | None = pydantic.Field(default=None, gt=0)
    factor: float = pydantic.Field(default=1.5, ge=1.0)

    default_message: ClassVar[str] = (
        "{name}: no good checkpoint for {value:.0f} {unit} (expected every {every:g} {unit}, "
        "{source}); last good: {since} (run {run}, rank {rank}, step {step})"
    )
    extra_fields: ClassVar[Mapping[str, object]] = {
        "unit": "steps",
        "every": 100,
        "source": "declared by the trainer",
        "since": "step 100 (ckpt-100.pt)",
        "failed_saves": 0,
    }


@dataclass
class _Save:
    path: str
    step: int | None
    t: float
    failed: bool = False


@dataclass
class _RunSaves:
    """One run's recent saves, the cadence its trainer declared and its newest start."""

    started: float
    saves: collections.deque[_Save] = field(
        default_factory=lambda: collections.deque(maxlen=SAVES_KEPT)
    )
    every_steps: int | None = None
    every_seconds: float | None = None
    saver: int = 0  # the rank of the newest save: the alert's rank
    alert_rank: int | None = None  # the rank of the episode being reported


class CheckpointMissingRule(Rule[CheckpointMissingSpec]):
    """No good save for ``factor`` times the cadence while the run's steps go on."""

    oneshot = False

    def __init__(self, name: str, spec: CheckpointMissingSpec, destinations: Sequence[str]) -> None:
        super().__init__(name, spec, destinations)
        self._runs: dict[str, _RunSaves] = {}

    def on_event(
        self, ctx: Context, run: str, rank: int, kind: str, attrs: Mapping[str, Any]
    ) -> None:
        if kind == protocol.HELLO:
            saves = self._runs.get(run)
            if saves is not None:
                saves.started = ctx.now()  # a restarted rank: its start-up is not overdue time
        elif kind == CHECKPOINT_EVENT:
            saves = self._saves(ctx, run)
            if saves is None:
                return
            path = attrs.get("path")
            saves.saves.append(_Save(str(path or ""), integer(attrs.get("step")), ctx.now()))
            saves.saver = max(rank, 0)
            every_steps = integer(attrs.get("every_steps"))
            every_seconds = finite_number(attrs.get("every_seconds"))
            if every_steps is not None and every_steps > 0:
                saves.every_steps = every_steps
            if every_seconds is not None and every_seconds > 0:
                saves.every_seconds = every_seconds
        elif kind == CHECKPOINT_FAILED:
            saves = self._runs.get(run)
            path = attrs.get("path")
            if saves is not None and isinstance(path, str):
                for save in saves.saves:
                    if save.path == path:
                        save.failed = True

    def on_tick(self, ctx: Context, now: float) -> None:
        configured = self.spec.every_steps is not None or self.spec.every_seconds is not None
        if not configured and not self._runs:
            return  # no cadence anywhere: nothing to judge
        by_run: dict[str, list[tuple[int, RankInfo]]] = {}
        for (run, rank), info in ctx.ranks.items():
            if rank >= 0:
                by_run.setdefault(run, []).append((rank, info))
        for run, ranks in by_run.items():
            saves = self._runs.get(run)
            if saves is None:
                if not configured or all(rank != 0 for rank, _ in ranks):
                    continue  # nothing expected here: no cadence, or rank 0 reports elsewhere
                saves = self._saves(ctx, run)
                if saves is None:
                    continue
            self._judge(ctx, run, saves, [info for _, info in ranks])

    def _judge(self, ctx: Context, run: str, saves: _RunSaves, ranks: list[RankInfo]) -> None:
        spec = self.spec
        every_steps = saves.every_steps or spec.every_steps
        every_seconds = saves.every_seconds or spec.every_seconds
        declared = saves.every_steps is not None or saves.every_seconds is not None
        live = [info for info in ranks if not info.said_bye]
        good = next((s for s in reversed(saves.saves) if not s.failed), None)
        steps = [info.last_step for info in live if info.last_step is not None]
        firsts = [info.first_step for info in ranks if info.first_step is not None]
        records = [info.last_record for info in live if info.last_record is not None]
        since_step = good.step if good is not None else (min(firsts) if firsts else None)
        since_t = max(good.t, saves.started) if good is not None else saves.started
        last_step = max(steps) if steps else None
        overdue: tuple[str, float, float, float] | None = None  # unit, value, threshold, every
        if every_steps is not None and last_step is not None and since_step is not None:
            behind = last_step - since_step
            if behind > spec.factor * every_steps:
                overdue = ("steps", float(behind), spec.factor * every_steps, every_steps)
        if overdue is None and every_seconds is not None and records:
            behind_seconds = max(records) - since_t  # records still arriving: training goes on
            if behind_seconds > spec.factor * every_seconds:
                threshold = spec.factor * every_seconds
                overdue = ("seconds", behind_seconds, threshold, every_seconds)
        if overdue is None:
            if saves.alert_rank is not None:
                ctx.report(self, run, saves.alert_rank, "", last_step, False)
                saves.alert_rank = None
            return
        if saves.alert_rank is None:
            saves.alert_rank = saves.saver
        unit, value, threshold, every = overdue
        failed = sum(1 for s in saves.saves if s.failed and (good is None or s.t > good.t))
        if good is not None:
            where = f"step {good.step}" if good.step is not None else "a save"
            since = f"{where} ({PurePath(good.path).name})"
        else:
            since = "none since the run started" + (
                f" (step {since_step})" if since_step is not None else ""
            )
        if failed:
            since += f", {failed} save{'s' if failed > 1 else ''} since failed the check"
        extra = {
            "unit": unit,
            "every": every,
            "source": "declared by the trainer" if declared else "as configured",
            "since": since,
            "failed_saves": failed,
        }
        ctx.report(self, run, saves.alert_rank, "", last_step, True, value, threshold, extra)

    def _saves(self, ctx: Context, run: str) -> _RunSaves | None:
        saves = self._runs.get(run)
        if saves is None and len(self._runs) < TABLE_LIMIT:
            saves = self._runs[run] = _RunSaves(ctx.now())
        return saves

    def forget(self, run: str, rank: int | None) -> None:
        if rank is None:
            self._runs.pop(run, None)
