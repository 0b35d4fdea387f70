"""A stored run sent into sinks later (``outrider replay``): an offline run to W&B online,
a run to a new TensorBoard directory, any run to a sink added after it ended.

The sinks get what they would have got live: the stored lines as batches again, with the
original steps and times (sinks/stored.py says how). Sinks are built by the agent's config
machinery and called directly, one batch list at a time, then flushed and closed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, SinkSettings
from agent.store.runs import load_info
from sinks import registry
from sinks.base import Batch, Sink
from sinks.stored import Sources, batches, iter_lines, run_end_last

logger = logging.getLogger("outrider.replay")

#: sinks a replay is refused for, and why: they show the present, not a run's history
REFUSED = {
    "prometheus": "Prometheus serves live gauges that a scrape reads now; a stored run's "
    "past values have no place there (scrape a live agent instead)",
    "otlp": "the OTLP sink pushes each series' latest value stamped with the push's time, "
    "so a replay would deliver only final values, at the wrong time",
}
EXPORT_BATCHES = 64  # batches handed to a sink per export call
RETRIES = 3
BACKOFF = 0.25


class ReplayError(ValueError):
    """A replay that cannot start (a refused sink, a sink that cannot be built)."""


def replay_config(config: AgentConfig) -> AgentConfig:
    """The config with a replay's defaults: W&B gets a history row for every step (its
    ``rows_per_second`` folds rows by wall time, and a replay takes seconds), unless the
    config sets it."""
    sinks = dict(config.sinks)
    settings = sinks.get("wandb")
    if settings is None or "rows_per_second" not in settings.options():
        base = settings.model_copy() if settings is not None else SinkSettings()
        extra = dict(base.model_extra or {})
        extra["rows_per_second"] = 0
        sinks["wandb"] = with_options(base, extra)
    if settings is None or "offline_at_end" not in settings.options():
        base = sinks["wandb"]
        extra = dict(base.model_extra or {})
        extra["offline_at_end"] = False  # the replay is that write; the sink need not read
        sinks["wandb"] = with_options(base, extra)
    return config.model_copy(update={"sinks": sinks})


def with_options(settings: SinkSettings, options: dict[str, Any]) -> SinkSettings:
    """``settings`` with the sink's own options replaced by ``options``."""
    return SinkSettings.model_validate(
        {
            "enabled": settings.enabled,
            "class": settings.class_,
            "queue_size": settings.queue_size,
            "retries": settings.retries,
            **options,
        }
    )


@dataclass
class SinkReplay:
    """One sink being fed: what it took and whether it gave up."""

    name: str
    sink: Sink
    target: str
    batches: int = 0
    entries: int = 0
    retries: int = 0
    error: str | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        counters: dict[str, int] = {}
        try:
            counters = self.sink.counters()
        except Exception as exc:
            logger.debug("sink %s counters failed: %r", self.name, exc)
        return {
            "sink": self.name,
            "target": self.target,
            "batches": self.batches,
            "entries": self.entries,
            "retries": self.retries,
            "error": self.error,
            "seconds": round(self.seconds, 3),
            "counters": counters,
        }


@dataclass
class Replay:
    """What a replay did, per sink."""

    run_id: str
    run_dir: Path
    lines: int = 0
    batches: int = 0
    sinks: list[SinkReplay] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_dir": str(self.run_dir),
            "lines": self.lines,
            "batches": self.batches,
            "sinks": [s.as_dict() for s in self.sinks],
            "skipped": self.skipped,
        }


def pick_sinks(config: AgentConfig, named: list[str] | None) -> tuple[list[str], dict[str, str]]:
    """The sinks to replay into, and those left out with why. A refused sink that was named
    (``--sinks``) is an error; one that is merely on in the config is left out."""
    enabled = list(config.enabled_sinks())
    if named is not None:
        for name in named:
            if name in REFUSED:
                raise ReplayError(f"sink {name} cannot replay a run: {REFUSED[name]}")
    skipped = {name: REFUSED[name] for name in enabled if name in REFUSED}
    return [name for name in enabled if name not in REFUSED], skipped


def target_of(name: str, sink: Sink, run_id: str, run_dir: Path) -> str:
    """Where a built-in sink puts a replayed run, for the summary line."""
    options = getattr(sink, "options", None)
    if name == "tensorboard":
        logdir = getattr(options, "logdir", None)
        return str(Path(logdir).expanduser() / run_id) if logdir else str(run_dir / "tensorboard")
    if name == "wandb":
        directory = getattr(options, "dir", None) or run_dir
        mode = getattr(sink, "mode", "?")
        return f"{Path(directory) / 'wandb'} ({mode})"
    return name


def check_targets(config: AgentConfig, names: list[str], run_dir: Path) -> None:
    """Refuse to add a second copy of the run to the TensorBoard log it already has."""
    if "tensorboard" not in names:
        return
    settings = config.sinks.get("tensorboard")
    if settings is not None and settings.options().get("logdir"):
        return
    own = run_dir / "tensorboard"
    if own.is_dir() and any(own.rglob("events.out.tfevents.*")):
        raise ReplayError(
            f"the run already has TensorBoard logs in {own}; replay into a new directory: "
            "--set tensorboard.logdir=DIR"
        )


def build_sinks(
    config: AgentConfig, names: list[str], runs_dir: Path, run_id: str, run_dir: Path
) -> list[SinkReplay]:
    """Each named sink built from its config settings; one that cannot be built stops the
    replay with its reason (nothing half-replayed)."""
    context = registry.SinkContext(runs_dir=runs_dir)
    built: list[SinkReplay] = []
    merged = config.enabled_sinks()
    for name in names:
        settings = merged[name]
        try:
            sink = registry.create(name, settings.options(), context, settings.class_)
        except registry.SinkConfigError as exc:
            raise ReplayError(str(exc)) from None
        except Exception as exc:  # a missing library, a bad directory
            raise ReplayError(f"sink {name}: cannot start: {type(exc).__name__}: {exc}") from None
        built.append(SinkReplay(name, sink, target_of(name, sink, run_id, run_dir)))
    return built


def _export(target: SinkReplay, chunk: list[Batch], sleep: Callable[[float], None]) -> None:
    """One export with the worker's retry rule: a few tries with backoff, then give up."""
    if target.error is not None:
        return
    started = time.monotonic()
    for attempt in range(RETRIES + 1):
        try:
            target.sink.export(chunk)
        except Exception as exc:
            if attempt == RETRIES:
                target.error = f"{type(exc).__name__}: {exc}"
                break
            target.retries += 1
            sleep(BACKOFF * 2**attempt)
            continue
        target.batches += len(chunk)
        target.entries += sum(len(b.entries) for b in chunk)
        break
    target.seconds += time.monotonic() - started


def replay(
    run_dir: Path,
    targets: list[SinkReplay],
    *,
    run_id: str | None = None,
    close_timeout: float = 60.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Replay:
    """Feed every line of the run in ``run_dir`` to ``targets``, then flush and close them.
    ``run_id`` gives the replayed run a new id in the sinks."""
    info = load_info(run_dir)
    name = run_id or str(info.get("run_id") or run_dir.name)
    done = Replay(name, run_dir, sinks=targets)
    sources = Sources(info, name)
    for target in targets:
        try:
            target.sink.prepare()
        except Exception as exc:  # as in the agent: left to the first export to fail
            logger.debug("sink %s prepare failed: %r", target.name, exc)
    chunk: list[Batch] = []
    for batch in batches(run_end_last(iter_lines(run_dir)), sources, run_dir):
        done.lines += len(batch.entries)
        done.batches += 1
        chunk.append(batch)
        if len(chunk) >= EXPORT_BATCHES:
            for target in targets:
                _export(target, chunk, sleep)
            chunk = []
    if chunk:
        for target in targets:
            _export(target, chunk, sleep)
    for target in targets:
        started = time.monotonic()
        for step, call in (("flush", target.sink.flush), ("close", target.sink.close)):
            try:
                call(close_timeout)
            except Exception as exc:
                target.error = target.error or f"{step}: {type(exc).__name__}: {exc}"
        target.seconds += time.monotonic() - started
    return done
