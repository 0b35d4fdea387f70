"""Job findings as alert entries, in the shape the alert engine's fired alerts have.

The aggregator stores, sends and delivers these like any alert (docs/alerts.md, "Job
alerts"): ``kind`` ``alert``, ``name``, ``severity``, ``message``, ``run``, ``rank``,
``step``, ``attrs`` (``metric``, ``value`` and ``threshold``, plus the finding's own
fields) and ``destinations``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

from agent.aggregation.divergence import DivergenceFinding
from agent.aggregation.stragglers import StragglerFinding
from agent.alerts.config import DEFAULT_DESTINATIONS
from sinks import schema

STRAGGLER = "straggler"
NODE_SILENT = "node_silent"
RANK_DIVERGENCE = "rank_divergence"
SEVERITY = "warning"

#: what to do, carried by each job alert as ``advice`` (docs/alerts.md, "Job alerts")
ADVICE = {
    STRAGGLER: (
        "Look at the rank's host: GPU clocks and temperature, CPU contention, a noisy "
        "neighbour, its data loader (data_wait_seconds) and its network links; drain the "
        "node if it stays slow."
    ),
    RANK_DIVERGENCE: (
        "A rank with its own loss reads its own data (a corrupt shard, different "
        "preprocessing on that node); a rank whose grad_norm differs after the all-reduce "
        "is out of sync (other code or model version): fix the node and restart from a "
        "checkpoint."
    ),
    NODE_SILENT: (
        "Check the node agent (outrider_uplink_connected on its /metrics, its log) and the "
        "machine; its trainers' records are still in its own run store."
    ),
}


def _where(rank: int, host: str | None, local_rank: int | None) -> str:
    if host is None:
        return f"rank {rank}"
    return f"rank {rank} on {host}" + ("" if local_rank is None else f" (local rank {local_rank})")


def _entry(
    name: str,
    message: str,
    run: str | None,
    rank: int,
    step: int | None,
    attrs: dict[str, Any],
    destinations: Sequence[str],
) -> dict[str, Any]:
    return {
        "kind": schema.ALERT,
        "name": name,
        "severity": SEVERITY,
        "message": message,
        "run": run,
        "rank": rank,
        "step": step,
        "attrs": attrs,
        "advice": ADVICE[name],
        "destinations": list(destinations),
    }


def straggler_alert(
    finding: StragglerFinding, destinations: Sequence[str] = DEFAULT_DESTINATIONS
) -> dict[str, Any]:
    """The ``straggler`` alert entry of ``finding``.

    ``attrs`` holds the flagged rank's backward time, the smallest and the median over the
    ranks (not all ranks' times: a job has thousands) and ``waits_least``.
    """
    f = finding
    message = (
        f"straggler: {_where(f.rank, f.host, f.local_rank)} takes {f.seconds:.4g} s in "
        f"{f.section} (fastest rank {f.fastest_seconds:.4g} s, its own best "
        f"{f.best_seconds:.4g} s): relative score {f.relative:.2f}, individual "
        f"{f.individual:.2f}, below {f.threshold:g} (run {f.run}, window {f.index}, step {f.step})"
    )
    if f.waits_least:
        message += "; it waits least in backward (the all-reduce waits for it)"
    backward = list(f.backward.values())
    attrs: dict[str, Any] = {
        "metric": f.section,
        "value": f.seconds,
        "threshold": f.threshold,
        "host": f.host,
        "local_rank": f.local_rank,
        "window": f.index,
        "reason": f.reason,
        "relative": f.relative,
        "individual": f.individual,
        "fastest_seconds": f.fastest_seconds,
        "best_seconds": f.best_seconds,
        "backward_seconds": f.backward.get(f.rank),
        "backward_min_seconds": min(backward) if backward else None,
        "backward_median_seconds": statistics.median(backward) if backward else None,
        "waits_least": f.waits_least,
    }
    return _entry(STRAGGLER, message, f.run, f.rank, f.step, attrs, destinations)


def divergence_alert(
    finding: DivergenceFinding, destinations: Sequence[str] = DEFAULT_DESTINATIONS
) -> dict[str, Any]:
    """The ``rank_divergence`` alert entry of ``finding``."""
    f = finding
    where = _where(f.rank, f.host, f.local_rank)
    if f.nonfinite:
        message = (
            f"rank divergence: {where} has non-finite {f.metric} values while the other ranks "
            f"have none (their median {f.median:.4g}; run {f.run}, window {f.index}, "
            f"step {f.step})"
        )
    else:
        message = (
            f"rank divergence: {where} has {f.metric}={f.value:.4g}, the other ranks' median "
            f"is {f.median:.4g}: {f.score:.1f} robust deviations, above {f.threshold:g} "
            f"(run {f.run}, window {f.index}, step {f.step})"
        )
    attrs: dict[str, Any] = {
        "metric": f.metric,
        "value": f.value if math.isfinite(f.value) else None,
        "threshold": f.threshold,
        "host": f.host,
        "local_rank": f.local_rank,
        "window": f.index,
        "median": f.median,
        "score": f.score if math.isfinite(f.score) else None,
        "nonfinite": f.nonfinite,
    }
    return _entry(RANK_DIVERGENCE, message, f.run, f.rank, f.step, attrs, destinations)


def node_silent_alert(
    run: str, node: str, seconds: float, destinations: Sequence[str] = DEFAULT_DESTINATIONS
) -> dict[str, Any]:
    """The ``node_silent`` alert: a node agent that has not said bye went quiet (its agent
    or machine died, or the network between it and the aggregator broke)."""
    message = (
        f"node silent: {node} has sent nothing for {seconds:.0f} s and has not said bye "
        f"(run {run}); its agent, its machine or the network to the aggregator may be down"
    )
    attrs = {"metric": None, "value": seconds, "threshold": None, "host": node}
    return _entry(NODE_SILENT, message, run, -1, None, attrs, destinations)
