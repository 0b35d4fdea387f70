"""Reading the run store back: ``outrider runs`` and ``outrider show``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from agent.store.layout import METRICS, RUN_JSON
from probe import protocol
from sinks import schema


class RunNotFound(LookupError):
    pass


def load_info(run_dir: Path) -> dict[str, Any]:
    return orjson.loads((run_dir / RUN_JSON).read_bytes())  # type: ignore[no-any-return]


#: the subdirectory where a node that hosts the job aggregator keeps job views
JOBS_DIR = "jobs"


def list_runs(runs_dir: Path) -> list[dict[str, Any]]:
    """One summary per run directory, newest first; unreadable ones are marked, not skipped.
    Job views a node keeps in ``jobs/`` are listed as ``jobs/<id>``."""
    rows = _list(runs_dir)
    for row in _list(runs_dir / JOBS_DIR):
        row["run_id"] = f"{JOBS_DIR}/{row['run_id']}"
        rows.append(row)
    rows.sort(key=lambda row: row.get("start_time") or 0, reverse=True)
    return rows


def _list(runs_dir: Path) -> list[dict[str, Any]]:
    if not runs_dir.is_dir():
        return []
    rows: list[dict[str, Any]] = []
    for run_dir in runs_dir.iterdir():
        if not (run_dir / RUN_JSON).exists():
            continue
        try:
            info = load_info(run_dir)
        except (OSError, orjson.JSONDecodeError) as exc:
            rows.append({"run_id": run_dir.name, "status": f"unreadable: {exc}"})
            continue
        start, end = info.get("start_time"), info.get("end_time")
        rows.append(
            {
                "run_id": info.get("run_id", run_dir.name),
                "start_time": start,
                "duration_s": (end - start) if start and end else None,
                "steps": info.get("last_step"),
                "status": info.get("status"),
                "exit_status": info.get("exit_status"),
                "records": info.get("records", 0),
                "dropped": info.get("dropped", 0),
                "lost": info.get("lost", 0),
                "job": "job" in info,
            }
        )
    return rows


def resolve(runs_dir: Path, name: str) -> Path:
    """A run by id, unique id prefix, or ``latest``."""
    if name == "latest":
        rows = list_runs(runs_dir)
        if not rows:
            raise RunNotFound(f"no runs in {runs_dir}")
        return runs_dir / str(rows[0]["run_id"])
    exact = runs_dir / name
    if (exact / RUN_JSON).exists():
        return exact
    matches = sorted(p for p in runs_dir.glob(f"{name}*") if (p / RUN_JSON).exists())
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise RunNotFound(f"no run {name!r} in {runs_dir} (see `outrider runs`)")
    raise RunNotFound(
        f"{name!r} matches {len(matches)} runs: " + ", ".join(p.name for p in matches)
    )


@dataclass
class MetricSummary:
    count: int = 0
    last: float = math.nan
    last_step: int | None = None
    min: float = math.inf
    min_step: int | None = None
    max: float = -math.inf
    non_finite: int = 0

    def add(self, value: float, step: int | None) -> None:
        self.count += 1
        self.last, self.last_step = value, step
        if not math.isfinite(value):
            self.non_finite += 1
            return
        if value < self.min:
            self.min, self.min_step = value, step
        if value > self.max:
            self.max = value

    def as_dict(self) -> dict[str, Any]:
        finite = self.count > self.non_finite
        return {
            "count": self.count,
            "last": schema.encode_number(self.last),
            "last_step": self.last_step,
            "min": self.min if finite else None,
            "min_step": self.min_step,
            "max": self.max if finite else None,
            "non_finite": self.non_finite,
        }


@dataclass
class RunSummary:
    info: dict[str, Any]
    metrics: dict[str, MetricSummary] = field(default_factory=dict)
    kinds: dict[str, int] = field(default_factory=dict)
    texts: list[dict[str, Any]] = field(default_factory=list)
    agent_kinds: dict[str, int] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dashboard: str | None = None
    inference: dict[str, Any] | None = None
    corrupt_lines: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "metrics": {name: m.as_dict() for name, m in sorted(self.metrics.items())},
            "records_by_kind": self.kinds,
            "agent_lines_by_kind": self.agent_kinds,
            "last_texts": self.texts,
            "last_alerts": self.alerts,
            "dashboard": self.dashboard,
            "inference": self.inference,
            "corrupt_lines": self.corrupt_lines,
        }


def summarise(run_dir: Path, keep_texts: int = 3, keep_alerts: int = 10) -> RunSummary:
    """Last/min/max of each metric (the trainer's and the agent's statistics), counts per
    record kind, the last texts and alerts and inference benchmark, from metrics.jsonl."""
    summary = RunSummary(load_info(run_dir))
    path = run_dir / METRICS
    if not path.exists():
        return summary
    with open(path, "rb") as lines:
        for line in lines:
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                summary.corrupt_lines += 1
                continue
            kind = entry.get("kind", "?")
            kinds = (
                summary.agent_kinds if entry.get("stream") == schema.AGENT_STREAM else summary.kinds
            )
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind == schema.ALERT:
                summary.alerts.append(
                    {key: entry.get(key) for key in ("name", "severity", "message", "step", "t")}
                )
                del summary.alerts[:-keep_alerts]
            elif kind == schema.IMAGE and entry.get("name") == "dashboard":
                summary.dashboard = entry.get("path")
            elif kind == protocol.SCALARS:
                step = entry.get("step")
                for name, value in entry.get("metrics", {}).items():
                    metric = summary.metrics.get(name)
                    if metric is None:
                        metric = summary.metrics[name] = MetricSummary()
                    metric.add(float(value), step)
            elif kind == protocol.EVENT and entry.get("name") == protocol.INFERENCE_EVENT:
                summary.inference = {"step": entry.get("step"), **(entry.get("attrs") or {})}
            elif kind == protocol.TEXT:
                summary.texts.append(
                    {
                        "name": entry.get("name"),
                        "step": entry.get("step"),
                        "text": entry.get("text"),
                    }
                )
                del summary.texts[:-keep_texts]
    return summary
