"""What a node agent sends up to the job aggregator, and when.

The node keeps the raw records (its run store, its per-rank ``/metrics``); the
job tier gets what a job view needs: each rank's closed windows, the alerts,
the trainers' events and config, and the node's accounting. Every item says
which process made it (host, local rank, torchrun restart), because a global
rank names a new process after each restart.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from agent.aggregation import wire
from agent.aggregation.uplink import Uplink
from agent.ingest.decode import Record, ScalarRows
from agent.store.run_store import RunStore
from probe import protocol
from sinks import schema
from sinks.health import TierHealth

#: trainer record kinds the job view keeps (text and tensors stay on the node)
FORWARDED_KINDS = frozenset({protocol.HELLO, protocol.EVENT, protocol.CONFIG, protocol.RUN_END})
#: stored line kinds ``forward_raw`` sends (tensor lines point into the node's tensors.bin)
RAW_KINDS = frozenset({protocol.SCALARS, protocol.EVENT, protocol.CONFIG})
#: most entries in one ``records`` item
RAW_CHUNK = 512


class Forwarder:
    """Picks what goes up; never blocks (the uplink queues or counts a drop)."""

    def __init__(
        self,
        uplink: Uplink,
        node: str,
        *,
        raw: bool = False,
        accounting_seconds: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.uplink = uplink
        self.node = node
        self.raw = raw
        self.accounting_seconds = accounting_seconds
        self.clock = clock
        self._last_accounting: dict[str, float] = {}
        self._said_hello: set[str] = set()
        self._ended: set[str] = set()  # runs whose stream said bye

    # -- from the receive loop -------------------------------------------------------
    def records(
        self,
        store: RunStore,
        envelope: dict[str, Any],
        records: Sequence[Record | ScalarRows],
        entries: Sequence[dict[str, Any]],
    ) -> None:
        """A trainer's message, just stored: its events up, and its lines if ``raw``."""
        job = store.run_id
        self._hello(store)
        for record in records:
            if isinstance(record, ScalarRows) or record.kind not in FORWARDED_KINDS:
                continue
            self.uplink.forward(
                job,
                wire.EVENT,
                {
                    "kind": record.kind,
                    "step": record.step,
                    "t": record.t,
                    "body": record.body,
                    **_who(envelope),
                },
            )
        if self.raw:
            lines = [entry for entry in entries if entry.get("kind") in RAW_KINDS]
            for start in range(0, len(lines), RAW_CHUNK):
                chunk = lines[start : start + RAW_CHUNK]
                self.uplink.forward(job, wire.RECORDS, {"entries": chunk, **_who(envelope)})

    def derived(self, store: RunStore, entry: dict[str, Any]) -> None:
        """An entry the node's analysis made: closed windows and alerts go up."""
        kind = entry.get("kind")
        if kind == schema.SUMMARY and entry.get("scope") == "window":
            self._hello(store)
            who = _rank_process(store, entry.get("rank", -1), self.node)
            self.uplink.forward(store.run_id, wire.WINDOW, {**entry, **who})
        elif kind == schema.ALERT:
            self._hello(store)
            self.uplink.forward(store.run_id, wire.ALERT, {"host": self.node, **entry})

    # -- once a beat -----------------------------------------------------------------
    def beat(self, stores: Iterable[RunStore]) -> None:
        """Each open run's accounting, every ``accounting_seconds``; a run whose launcher
        said the trainer ended gets its final accounting and its stream's bye at once (a
        long-lived node agent serves one job after another)."""
        now = self.clock()
        for store in stores:
            if store.run_id in self._ended:
                continue
            if "exit_status" in store.info:
                self._ended.add(store.run_id)
                self.accounting(store)
                self.uplink.end(store.run_id)
                continue
            last = self._last_accounting.get(store.run_id)
            if last is not None and now - last < self.accounting_seconds:
                continue
            self._last_accounting[store.run_id] = now
            self.accounting(store)

    def accounting(self, store: RunStore) -> None:
        """The node's per-stream ledgers of ``store``'s run: tier one of the job's sums."""
        streams = [ledger.summary() for ledger in store.streams.values()]
        self.uplink.forward(store.run_id, wire.ACCOUNTING, {"streams": streams})

    def health(self) -> TierHealth:
        """The uplink's figures, summed over its jobs, for /metrics and run.json."""
        stats = self.uplink.stats()
        jobs = list((stats.get("jobs") or {}).values())
        dropped: dict[str, int] = {}
        for job in jobs:
            for reason, count in (job.get("dropped") or {}).items():
                dropped[reason] = dropped.get(reason, 0) + count
        return TierHealth(
            role="node",
            connected=bool(stats.get("connected")),
            produced=sum(job.get("produced", 0) for job in jobs),
            sent=sum(job.get("sent", 0) for job in jobs),
            backlog=sum(job.get("backlog", 0) + job.get("spooled", 0) for job in jobs),
            dropped=dropped,
            handshake_failures=int(stats.get("handshake_failures", 0)),
        )

    def close(self, stores: Iterable[RunStore], timeout: float) -> None:
        """Final accounting of every run, then the uplink's bye (bounded by ``timeout``)."""
        for store in stores:
            if store.run_id not in self._ended:
                self.accounting(store)
        self.uplink.close(timeout)

    def _hello(self, store: RunStore) -> None:
        if store.run_id in self._said_hello:
            return
        self._said_hello.add(store.run_id)
        meta = {key: store.info[key] for key in ("command", "launcher") if key in store.info}
        self.uplink.forward(store.run_id, wire.HELLO, {"host": self.node, "meta": meta})


def _who(envelope: dict[str, Any]) -> dict[str, Any]:
    return {
        "rank": envelope["rank"],
        "local_rank": envelope["local_rank"],
        "world_size": envelope["world_size"],
        "restart": envelope.get("restart", 0),
        "host": envelope["host"],
    }


def _rank_process(store: RunStore, rank: int, node: str) -> dict[str, Any]:
    """Host, local rank, world size and restart of the latest stream of ``rank``."""
    latest = None
    for ledger in store.streams.values():
        if ledger.rank == rank and (latest is None or ledger.restart >= latest.restart):
            latest = ledger
    if latest is None:
        return {"host": node, "local_rank": -1, "world_size": 0, "restart": 0}
    return {
        "host": latest.host,
        "local_rank": latest.local_rank,
        "world_size": latest.world_size,
        "restart": latest.restart,
    }
