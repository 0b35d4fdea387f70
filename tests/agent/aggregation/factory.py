"""Synthetic rank window summaries, in the shape agent/analysis/summaries.py makes them."""

from __future__ import annotations

from typing import Any

from agent.aggregation.windows import JobWindow

RANKS_PER_HOST = 4


def stats(mean: float | None, nonfinite: int = 0, count: int = 100) -> dict[str, Any]:
    """One metric's window figures: ``mean`` None means the window had no finite value."""
    if mean is None:
        return {"count": 0, "nonfinite": nonfinite, "mean": None, "std": None, "min": None,
                "max": None, "last": None}  # fmt: skip
    return {"count": count, "nonfinite": nonfinite, "mean": mean, "std": 0.01 * abs(mean),
            "min": mean, "max": mean, "last": mean}  # fmt: skip


def summary(
    rank: int,
    index: int,
    metrics: dict[str, float | dict[str, Any] | None] | None = None,
    derived: dict[str, float] | None = None,
    *,
    restart: int = 0,
    world_size: int | None = None,
    run: str = "job",
    window_steps: int = 100,
) -> dict[str, Any]:
    """Rank ``rank``'s summary of window ``index``, with the fields a node agent adds."""
    entry: dict[str, Any] = {
        "kind": "summary",
        "scope": "window",
        "index": index,
        "run": run,
        "rank": rank,
        "step": index * window_steps + window_steps - 1,
        "first_step": index * window_steps,
        "last_step": index * window_steps + window_steps - 1,
        "t_start": float(index),
        "t_end": index + 0.99,
        "metrics": {
            name: value if isinstance(value, dict) else stats(value)
            for name, value in (metrics or {}).items()
        },
        "derived": dict(derived or {}),
        "host": f"node{rank // RANKS_PER_HOST}",
        "local_rank": rank % RANKS_PER_HOST,
        "restart": restart,
    }
    if world_size is not None:
        entry["world_size"] = world_size
    return entry


def job_window(
    index: int,
    per_rank: dict[int, dict[str, Any]],
    derived: dict[int, dict[str, float]] | None = None,
) -> JobWindow:
    """A complete job window: ``per_rank`` maps rank -> {metric: window mean}."""
    return JobWindow(
        index,
        {
            rank: summary(rank, index, metrics, (derived or {}).get(rank))
            for rank, metrics in per_rank.items()
        },
    )
