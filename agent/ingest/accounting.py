"""Per-stream sequence accounting: proof that nothing was lost silently.

Every record a probe produces takes the next sequence number of its stream,
dropped or not. For each stream the agent knows what it received, what the
probe says it dropped (by reason), and the gaps in the numbers. Once the
stream has said bye, ``received + dropped + lost == produced`` exactly, where
``lost`` is what vanished between the probe and the agent (an agent killed
with records in its socket, an exit linger that ran out). ``received`` counts
what reached the agent; ``not_stored`` says how many of those the run store
could not keep (a full or failing disk), by reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.ingest.decode import Record, ScalarRows
from probe import protocol


class SeqAccounting:
    """The arithmetic of a sequence-numbered stream, for any ledger that keeps these four
    counts: what was sent, what never arrived, and what of that nobody accounted for."""

    received: int
    max_seq: int
    produced: int  # a lower bound until the stream ends, exact after
    dropped: dict[str, int]  # what the sender says it dropped, by reason

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def sent(self) -> int:
        """Items the stream produced, as far as we can tell (exact once it ended)."""
        return max(self.produced, self.max_seq + 1)

    @property
    def gaps(self) -> int:
        """Sequence numbers never received (dropped, lost, or still in flight)."""
        return self.sent - self.received

    @property
    def lost(self) -> int:
        """Gaps the sender did not account for; final once the stream ended."""
        return max(0, self.gaps - self.dropped_total)


@dataclass
class StreamLedger(SeqAccounting):
    stream: str
    rank: int
    local_rank: int
    world_size: int
    host: str
    pid: int
    restart: int = 0  # torchrun's restart count
    received: int = 0
    max_seq: int = -1
    produced: int = 0  # lower bound until bye, exact after it
    dropped: dict[str, int] = field(default_factory=dict)
    not_stored: dict[str, int] = field(default_factory=dict)  # of ``received``, by reason
    invalid_values: int = 0
    internal_errors: int = 0
    said_bye: bool = False
    last_t: float = 0.0
    last_step: int | None = None

    @classmethod
    def from_envelope(cls, envelope: dict[str, Any]) -> StreamLedger:
        """A ledger for the stream the envelope names (every identity field but the run)."""
        keys = (*protocol.ENVELOPE_KEYS, *protocol.OPTIONAL_ENVELOPE)
        return cls(**{key: envelope[key] for key in keys if key != "run" and key in envelope})

    def observe(
        self, kind: str, seq: int, t: float, step: int | None, body: dict[str, Any]
    ) -> None:
        """Account for one received record."""
        self.received += 1
        if seq > self.max_seq:
            self.max_seq = seq
        if t > self.last_t:
            self.last_t = t
        if step is not None and (self.last_step is None or step > self.last_step):
            self.last_step = step
        if kind == protocol.PROBE_STATS or kind == protocol.BYE:
            self._take_counters(body, final=kind == protocol.BYE)

    def observe_batch(self, records: Sequence[Record | ScalarRows], count: int) -> None:
        """Account for the ``count`` records of one message (cheaper than one call each)."""
        self.received += count
        top_seq = self.max_seq
        top_step = self.last_step
        for record in records:
            if isinstance(record, ScalarRows):
                seq, step = record.top_seq, record.top_step
            else:
                seq, step = record.seq, record.step
                if record.kind == protocol.PROBE_STATS or record.kind == protocol.BYE:
                    self._take_counters(record.body, final=record.kind == protocol.BYE)
            if seq > top_seq:
                top_seq = seq
            if step is not None and (top_step is None or step > top_step):
                top_step = step
        self.max_seq = top_seq
        self.last_step = top_step
        last = records[-1]
        t = last.ts[-1] if isinstance(last, ScalarRows) else last.t
        if t > self.last_t:
            self.last_t = t

    def _take_counters(self, body: dict[str, Any], *, final: bool) -> None:
        dropped = body.get("dropped", {})
        # Counters only grow; an older report arriving late must not shrink them.
        for reason, count in dropped.items():
            if count > self.dropped.get(reason, 0):
                self.dropped[reason] = count
        self.invalid_values = max(self.invalid_values, int(body.get("invalid_values", 0)))
        self.internal_errors = max(self.internal_errors, int(body.get("internal_errors", 0)))
        if final:
            self.said_bye = True
            self.produced = max(self.produced, int(body.get("produced", 0)))

    def restore(self, summary: dict[str, Any]) -> None:
        """Fold in a previous agent's ``summary()`` of this stream: the records it received
        but could not store, and counters whose records may not be in the store."""
        for reason, count in dict(summary.get("not_stored") or {}).items():
            count = int(count)
            self.not_stored[reason] = self.not_stored.get(reason, 0) + count
            self.received += count
        self.max_seq = max(self.max_seq, int(summary.get("sent", 0)) - 1)
        self._take_counters(summary, final=bool(summary.get("complete")))
        if self.said_bye:
            self.produced = max(self.produced, int(summary.get("sent", 0)))
        last_step = summary.get("last_step")
        if isinstance(last_step, int) and (self.last_step is None or last_step > self.last_step):
            self.last_step = last_step

    def summary(self) -> dict[str, Any]:
        return {
            "stream": self.stream,
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "host": self.host,
            "pid": self.pid,
            "restart": self.restart,
            "sent": self.sent,
            "received": self.received,
            "dropped": dict(self.dropped),
            "not_stored": dict(self.not_stored),
            "gaps": self.gaps,
            "lost": self.lost,
            "complete": self.said_bye,
            "invalid_values": self.invalid_values,
            "internal_errors": self.internal_errors,
            "last_step": self.last_step,
        }
