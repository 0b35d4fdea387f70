"""Per-uplink accounting at the aggregator: the second tier of the accounting identity.

Each (job, node, agent) stream numbers every item it produces, dropped ones
included, and reports its own drops by reason in its heartbeat, accounting
and bye items. From those and the seqs it saw, the aggregator knows for each
stream ``received + dropped + lost == sent``, exactly once the stream has
said bye; ``lost`` is what vanished between the node and the aggregator (an
aggregator killed with items in its socket, a connection that broke with
items in the kernel's buffers). Same semantics as the node's
``agent.ingest.accounting.StreamLedger``, one tier up.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from agent.aggregation.wire import BYE, COUNTER_KINDS, Item
from agent.ingest.accounting import SeqAccounting

#: how many recent seqs a ledger remembers to tell a repeated item from a new one. A
#: repeat of an older seq than that is counted again (the transport never repeats an
#: item; this only guards a replay of recent messages).
RECENT_SEQS = 4096


@dataclass
class UplinkLedger(SeqAccounting):
    job: str
    node: str
    agent: str
    pid: int
    received: int = 0
    max_seq: int = -1
    produced: int = 0  # lower bound until bye, exact after it
    dropped: dict[str, int] = field(default_factory=dict)  # the node's own counts, by reason
    duplicates: int = 0  # repeated seqs, not counted as received
    said_bye: bool = False
    last_t: float = 0.0
    _recent: collections.deque[int] = field(default_factory=collections.deque, repr=False)
    _recent_set: set[int] = field(default_factory=set, repr=False)

    @classmethod
    def from_envelope(cls, envelope: dict[str, Any]) -> UplinkLedger:
        return cls(envelope["job"], envelope["node"], envelope["agent"], envelope["pid"])

    def observe(self, item: Item) -> None:
        """Account for one received item (of ``wire.decode``'s checked items)."""
        seq = item.seq
        if seq in self._recent_set:
            self.duplicates += 1
            return
        self._recent_set.add(seq)
        self._recent.append(seq)
        if len(self._recent) > RECENT_SEQS:
            self._recent_set.discard(self._recent.popleft())
        self.received += 1
        if seq > self.max_seq:
            self.max_seq = seq
        if item.t > self.last_t:
            self.last_t = item.t
        if item.kind in COUNTER_KINDS:
            self._take_counters(item.body["uplink"], final=item.kind == BYE)

    def _take_counters(self, counters: dict[str, Any], *, final: bool) -> None:
        # Counters only grow; an older report arriving late must not shrink them.
        for reason, count in counters.get("dropped", {}).items():
            if count > self.dropped.get(reason, 0):
                self.dropped[reason] = count
        if final:
            self.said_bye = True
            self.produced = max(self.produced, int(counters.get("produced", 0)))

    def restore(self, summary: dict[str, Any]) -> None:
        """Fold in what a previous aggregator knew of this stream (its ``summary()``, from
        its run.json): the items it received count as received here too."""
        self.received += int(summary.get("received", 0))
        self.duplicates += int(summary.get("duplicates", 0))
        self.max_seq = max(self.max_seq, int(summary.get("sent", 0)) - 1)
        self.last_t = max(self.last_t, float(summary.get("last_t", 0.0)))
        complete = bool(summary.get("complete"))
        self._take_counters(
            {"dropped": dict(summary.get("dropped") or {}), "produced": summary.get("sent", 0)},
            final=complete,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "node": self.node,
            "agent": self.agent,
            "pid": self.pid,
            "sent": self.sent,
            "received": self.received,
            "dropped": dict(self.dropped),
            "gaps": self.gaps,
            "lost": self.lost,
            "duplicates": self.duplicates,
            "complete": self.said_bye,
            "last_t": self.last_t,
        }
