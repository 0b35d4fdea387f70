"""Per-uplink accounting at the aggregator: received + dropped + lost == sent."""

from __future__ import annotations

from typing import Any

from agent.aggregation import wire
from agent.aggregation.ledger import RECENT_SEQS, UplinkLedger
from agent.aggregation.wire import Item

ENVELOPE = {"job": "job-1", "node": "node-a", "agent": "a1", "pid": 7}


def counters(produced: int, **dropped: int) -> dict[str, Any]:
    return {"uplink": {"produced": produced, "dropped": dropped}}


def identity(ledger: UplinkLedger) -> bool:
    return ledger.received + ledger.dropped_total + ledger.lost == ledger.sent


def test_gaps_split_into_dropped_and_lost() -> None:
    """Seqs never seen are the node's drops first, the rest lost; exact after bye."""
    ledger = UplinkLedger.from_envelope(ENVELOPE)
    for seq in (0, 1, 2, 5, 6):  # 3, 4 missing
        ledger.observe(Item(wire.WINDOW, seq, 1.0 + seq, {}))
    ledger.observe(Item(wire.HEARTBEAT, 7, 8.0, counters(8, backlog_full=1)))
    assert (ledger.sent, ledger.received, ledger.gaps, ledger.lost) == (8, 6, 2, 1)
    assert identity(ledger) and not ledger.said_bye
    # 8, 9 never arrive; the bye says 11 were produced, two dropped in all
    ledger.observe(Item(wire.BYE, 10, 11.0, counters(11, backlog_full=1, shutdown=1)))
    assert ledger.said_bye and ledger.sent == 11 and ledger.received == 7
    assert ledger.dropped == {"backlog_full": 1, "shutdown": 1}
    assert ledger.lost == 2 and identity(ledger)
    assert ledger.last_t == 11.0


def test_counters_only_grow() -> None:
    """An older report arriving after a newer one does not shrink the drops."""
    ledger = UplinkLedger.from_envelope(ENVELOPE)
    ledger.observe(Item(wire.HEARTBEAT, 5, 1.0, counters(6, spool_full=4)))
    ledger.observe(Item(wire.ACCOUNTING, 3, 1.0, {"streams": [], **counters(4, spool_full=2)}))
    assert ledger.dropped == {"spool_full": 4}


def test_repeated_seqs_are_not_counted_twice() -> None:
    """A recent seq seen again counts as a duplicate, not as received."""
    ledger = UplinkLedger.from_envelope(ENVELOPE)
    for seq in (0, 1, 1, 2, 0):
        ledger.observe(Item(wire.WINDOW, seq, 1.0, {}))
    assert ledger.received == 3 and ledger.duplicates == 2 and ledger.lost == 0
    for seq in range(3, 3 + RECENT_SEQS):
        ledger.observe(Item(wire.WINDOW, seq, 1.0, {}))
    ledger.observe(Item(wire.WINDOW, 0, 1.0, {}))  # older than the window: counted again
    assert ledger.duplicates == 2


def test_restore_continues_a_previous_aggregators_ledger() -> None:
    """An aggregator restarted from its run.json carries on the counts: what the old one
    received, the node's drops, and the bye it had seen."""
    old = UplinkLedger.from_envelope(ENVELOPE)
    for seq in range(10):
        old.observe(Item(wire.WINDOW, seq, 1.0, {}))
    old.observe(Item(wire.HEARTBEAT, 11, 2.0, counters(12, backlog_full=1)))  # 10 dropped
    new = UplinkLedger.from_envelope(ENVELOPE)
    new.restore(old.summary())
    assert new.summary() == old.summary()
    for seq in (14, 15):  # 12, 13 vanished with the old aggregator
        new.observe(Item(wire.WINDOW, seq, 3.0, {}))
    new.observe(Item(wire.BYE, 16, 4.0, counters(17, backlog_full=1)))
    assert new.received == 14 and new.sent == 17 and new.lost == 2 and identity(new)
    done = UplinkLedger.from_envelope(ENVELOPE)
    done.restore(new.summary())
    assert done.said_bye and done.sent == 17 and done.summary() == new.summary()
