"""The agent's health snapshot, built in one place from what each room counts.

The receive loop's counters, the sinks' workers, the analysis's figures and
the run stores' stream ledgers each keep their own numbers; this module reads
them into one ``sinks.health.AgentHealth``, the form both ``/metrics`` and
run.json are made from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from agent.fanout import Fanout
from agent.ingest.counters import AgentCounters
from agent.store.run_store import RunStore
from sinks.health import (
    AgentHealth,
    AnalysisHealth,
    StreamHealth,
    TierHealth,
)


def agent_health(
    counters: AgentCounters,
    fanout: Fanout | None = None,
    analysis: AnalysisHealth | None = None,
    runs: Iterable[tuple[str, RunStore]] | None = None,
    tier: TierHealth | None = None,
) -> AgentHealth:
    """The agent's health now.

    ``analysis`` is ``Analysis.stats()`` (None: no analysis); ``runs`` are
    the open runs whose streams the snapshot shows (None: left out, as in
    run.json, which records its streams itself).
    """
    return AgentHealth(
        messages=counters.messages,
        records=counters.records,
        bytes=counters.bytes,
        rejected_messages=dict(counters.rejected_messages),
        rejected_records=dict(counters.rejected_records),
        sinks=fanout.snapshot() if fanout is not None else {},
        analysis=analysis,
        runs=None if runs is None else {run_id: _streams(store) for run_id, store in runs},
        metric_values_over_cap=counters.metric_values_over_cap,
        tier=tier,
    )


def _streams(store: RunStore) -> tuple[StreamHealth, ...]:
    return tuple(
        StreamHealth(
            stream=ledger.stream,
            rank=ledger.rank,
            host=ledger.host,
            sent=ledger.sent,
            received=ledger.received,
            dropped=dict(ledger.dropped),
            lost=ledger.lost,
            complete=ledger.said_bye,
            not_stored=dict(ledger.not_stored),
        )
        for ledger in list(store.streams.values())
    )


def read_retrying(
    build: Callable[[], AgentHealth], fallback: Callable[[], AgentHealth]
) -> AgentHealth:
    """``build()``, read again if a dict changed size under it (another thread's scrape of a
    loop that keeps running), ``fallback()`` after three tries."""
    for _ in range(3):
        try:
            return build()
        except RuntimeError:
            continue
    return fallback()
