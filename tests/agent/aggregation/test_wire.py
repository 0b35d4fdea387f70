"""The uplink wire format: round trips, hard limits, and any input refused with a reason
(hypothesis; tests/conftest.py sets the profile)."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.aggregation import wire
from agent.aggregation.wire import Item, Rejected, UplinkMessage, decode, encode
from tests.agent.ingest.hostile import MAX_COUNT, anything, plain

ENVELOPE = {"job": "job-1", "node": "node-a", "agent": "a1b2c3", "pid": 42}
COUNTERS = {"uplink": {"produced": 3, "dropped": {"backlog_full": 1}}}
GOOD_BODIES: dict[str, dict[str, Any]] = {
    wire.HELLO: {"heartbeat_seconds": 2.0},
    wire.WINDOW: {"rank": 0, "loss": {"mean": 0.5, "max": float("nan")}},
    wire.ALERT: {"rule": "loss_spike", "message": "loss jumped"},
    wire.EVENT: {"kind": "event", "body": {"name": "eval", "attrs": {"a": [1, 2]}}},
    wire.RECORDS: {"entries": [{"kind": "scalars", "body": {"loss": 1.0}}]},
    wire.ACCOUNTING: {"streams": [{"stream": "s", "sent": 3}], **COUNTERS},
    wire.HEARTBEAT: COUNTERS,
    wire.BYE: COUNTERS,
}


def reason_of(raw: bytes) -> UplinkMessage | str:
    """The decoded message, or the reason it was refused; any other exception fails."""
    try:
        return decode(raw)
    except Rejected as rejected:
        assert rejected.reason in wire.MESSAGE_REASONS, rejected
        return rejected.reason


def test_round_trip_every_kind() -> None:
    """What ``encode`` and the uplink's ``join`` make, ``decode`` gives back whole."""
    items = [
        Item(kind, seq, 1.5 + seq, body) for seq, (kind, body) in enumerate(GOOD_BODIES.items())
    ]
    raw = encode(ENVELOPE, items)
    header = wire.pack_header(ENVELOPE)
    joined = wire.join(header, [wire.pack_item(i.kind, i.seq, i.t, i.body) for i in items])
    assert joined == raw
    message = decode(raw)
    assert message.envelope == ENVELOPE and message.rejected == []
    assert [i.kind for i in message.items] == list(GOOD_BODIES)
    assert message.items[1].body["loss"]["max"] != message.items[1].body["loss"]["max"]  # nan
    assert math.isnan(message.items[1].body["loss"]["max"])
    assert message.items[0] == items[0]


@pytest.mark.parametrize("count", [0, 15, 16, 65535, 65536])
def test_join_makes_any_array_size(count: int) -> None:
    """``join``'s array header is msgpack's for every size class."""
    frame = wire.pack_item(wire.WINDOW, 0, 1.0, {})
    joined = wire.join(wire.pack_header(ENVELOPE), [frame] * count)
    assert joined == encode(ENVELOPE, [[wire.WINDOW, 0, 1.0, {}]] * count)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xc1", "malformed"),
        (msgpack.packb([2, ENVELOPE, []]), "bad_version"),
        (msgpack.packb([True, ENVELOPE, []]), "bad_version"),
        (msgpack.packb([1, {**ENVELOPE, "job": "../etc"}, []]), "bad_envelope"),
        (msgpack.packb([1, {**ENVELOPE, "agent": ""}, []]), "bad_envelope"),
        (msgpack.packb([1, {**ENVELOPE, "pid": -1}, []]), "bad_envelope"),
        (msgpack.packb([1, {**ENVELOPE, "node": "x" * 257}, []]), "bad_envelope"),
        (msgpack.packb([1, ENVELOPE, {}]), "malformed"),
        (msgpack.packb([1, ENVELOPE, [0] * (wire.MAX_ITEMS + 1)]), "malformed"),
        (b"\x00" * (wire.MAX_MESSAGE_BYTES + 1), "oversized"),
        (msgpack.packb([1, ENVELOPE, ["x" * (wire.MAX_STRING_BYTES + 1)]]), "malformed"),
    ],
)
def test_bad_messages_are_refused_whole(raw: bytes, reason: str) -> None:
    """A message that cannot be read, or of another version or stream, is refused whole."""
    assert reason_of(raw) == reason


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (["nope", 0, 1.0, {}], "unknown_kind"),
        ([wire.WINDOW, -1, 1.0, {}], "bad_item"),
        ([wire.WINDOW, MAX_COUNT + 1, 1.0, {}], "bad_item"),
        ([wire.WINDOW, True, 1.0, {}], "bad_item"),
        ([wire.WINDOW, 0, float("inf"), {}], "bad_item"),
        ([wire.WINDOW, 0, 1.0, []], "bad_item"),
        ([wire.WINDOW, 0, 1.0, {1: 2}], "bad_item"),
        ([wire.WINDOW, 0, 1.0, {"b": b"bytes"}], "bad_item"),
        ([wire.WINDOW, 0, 1.0, {"deep": nested(wire.MAX_DEPTH + 1)}], "bad_item"),
        ([wire.HEARTBEAT, 0, 1.0, {}], "bad_item"),
        ([wire.BYE, 0, 1.0, {"uplink": {"produced": -1}}], "bad_item"),
        ([wire.BYE, 0, 1.0, {"uplink": {"produced": 1, "dropped": {"x": -1}}}], "bad_item"),
        ([wire.RECORDS, 0, 1.0, {"entries": {}}], "bad_item"),
        ([wire.ACCOUNTING, 0, 1.0, {"streams": [1], **COUNTERS}], "bad_item"),
        ([wire.WINDOW, 0, 1.0], "bad_item"),
    ],
)
def test_bad_items_are_refused_alone(item: list[Any], reason: str) -> None:
    """A bad item is refused with its reason; the good items beside it are kept."""
    good = [wire.WINDOW, 1, 1.0, {"ok": True}]
    message = decode(msgpack.packb([1, ENVELOPE, [good, item, good]], use_bin_type=True))
    assert [i.body for i in message.items] == [{"ok": True}] * 2
    assert [r for r, _ in message.rejected] == [reason]


def test_depth_limit_is_inclusive() -> None:
    """A body nested exactly MAX_DEPTH levels deep is accepted."""
    item = [wire.WINDOW, 0, 1.0, {"deep": nested(wire.MAX_DEPTH - 1)}]
    assert decode(encode(ENVELOPE, [item])).rejected == []


@given(st.binary(max_size=200))
def test_any_bytes_are_decoded_or_refused(raw: bytes) -> None:
    """Random bytes never raise anything but Rejected."""
    reason_of(raw)


@given(anything)
def test_any_msgpack_value_is_decoded_or_refused(value: Any) -> None:
    """Any msgpack value as a message never raises anything but Rejected."""
    reason_of(msgpack.packb(value, use_bin_type=True))


@given(
    st.lists(
        anything
        | st.tuples(st.sampled_from(sorted(wire.KINDS)), anything, anything, anything).map(list),
        max_size=6,
    )
)
def test_any_items_are_accepted_or_refused_each(items: list[Any]) -> None:
    """With a good envelope, every item is accepted or refused with an item reason."""
    result = reason_of(msgpack.packb([1, ENVELOPE, items], use_bin_type=True))
    assert isinstance(result, UplinkMessage), result
    assert len(result.items) + len(result.rejected) == len(items)
    assert {r for r, _ in result.rejected} <= wire.ITEM_REASONS


@given(st.sampled_from(sorted(GOOD_BODIES)), st.integers(0, MAX_COUNT), plain(4))
def test_plain_bodies_round_trip(kind: str, seq: int, extra: Any) -> None:
    """Any JSON-like body of a known kind goes through unchanged."""
    body = {**GOOD_BODIES[kind], "extra": extra}
    message = decode(encode(ENVELOPE, [[kind, seq, 2.0, body]]))
    assert message.rejected == []
    assert message.items[0].seq == seq
    assert msgpack.packb(message.items[0].body) == msgpack.packb(body)
