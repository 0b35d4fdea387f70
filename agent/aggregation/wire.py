"""The uplink wire format: what a node agent sends its job aggregator (version 1).

One ZeroMQ message is msgpack ``[UPLINK_VERSION, envelope, items]``. The
envelope names the stream (job, node, and ``agent``, an id drawn once per
node-agent process, so a restarted node agent is a new stream); each item is
``[kind, seq, t, body]``, ``seq`` counting every item the stream ever
produced, dropped ones included, so the aggregator can tell what it lost.

``decode`` survives any input: a message that cannot be read or whose
envelope is wrong is refused whole (``Rejected``); a bad item is refused
alone, with a reason, and the good items around it are kept.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from agent.ingest.decode import MAX_COUNT, RUN_ID, STREAM_ID
from probe import protocol

UPLINK_VERSION: Final = 1

HELLO: Final = "hello"  # first item of a stream: how often it beats
WINDOW: Final = "window"  # a node's window summary entry
ALERT: Final = "alert"  # an alert the node fired
EVENT: Final = "event"  # a trainer's event, config, text or run_end entry
RECORDS: Final = "records"  # raw stored entries: {"entries": [...]}
ACCOUNTING: Final = "accounting"  # the node's per-probe-stream ledgers: {"streams": [...]}
HEARTBEAT: Final = "heartbeat"  # liveness, with the stream's counters
BYE: Final = "bye"  # the stream's last item, with its final counters
KINDS: Final = frozenset((HELLO, WINDOW, ALERT, EVENT, RECORDS, ACCOUNTING, HEARTBEAT, BYE))
#: kinds whose body carries the stream's own counters under ``"uplink"``
COUNTER_KINDS: Final = frozenset((HEARTBEAT, ACCOUNTING, BYE))

ENVELOPE_KEYS: Final = ("job", "node", "agent", "pid")

#: why the uplink gave an item up (its counters say how many, per reason)
DROP_BACKLOG_FULL: Final = "backlog_full"  # the in-memory backlog was full (no spool)
DROP_SPOOL_FULL: Final = "spool_full"  # the backlog and the spool on disk were both full
DROP_UNENCODABLE: Final = "unencodable"  # msgpack cannot carry the body
DROP_INVALID: Final = "invalid"  # the aggregator would refuse it (kind, job id, body shape)
DROP_TOO_LARGE: Final = "too_large"  # one item over MAX_ITEM_BYTES
DROP_SHUTDOWN: Final = "shutdown"  # still unsent when close() ran out of time
DROP_REASONS: Final = (
    DROP_BACKLOG_FULL,
    DROP_SPOOL_FULL,
    DROP_UNENCODABLE,
    DROP_INVALID,
    DROP_TOO_LARGE,
    DROP_SHUTDOWN,
)

MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
MAX_ITEM_BYTES: Final = MAX_MESSAGE_BYTES - 64 * 1024  # room for the envelope
MAX_ITEMS: Final = 4096
MAX_DEPTH: Final = 16  # a records item holds stored entries, which hold configs
MAX_CONTAINER: Final = 16384  # entries of any one map or array
MAX_STRING_BYTES: Final = 1024 * 1024
MAX_NAME_CHARS: Final = protocol.MAX_NAME_CHARS

MESSAGE_REASONS: Final = frozenset(("oversized", "malformed", "bad_version", "bad_envelope"))
ITEM_REASONS: Final = frozenset(("bad_item", "unknown_kind"))


class Rejected(Exception):
    """A whole message was refused; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Item:
    kind: str
    seq: int
    t: float
    body: dict[str, Any]


@dataclass
class UplinkMessage:
    """One checked message: its stream's envelope, the good items, and why each bad one
    was refused."""

    envelope: dict[str, Any]
    items: list[Item]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) per item


def encode(envelope: dict[str, Any], items: Iterable[Item | Sequence[Any]]) -> bytes:
    """One message; raises whatever msgpack raises for a value it cannot carry."""
    wire = [
        [item.kind, item.seq, item.t, item.body] if isinstance(item, Item) else list(item)
        for item in items
    ]
    return msgpack.packb([UPLINK_VERSION, envelope, wire], use_bin_type=True)  # type: ignore[no-any-return]


def pack_item(kind: str, seq: int, t: float, body: dict[str, Any]) -> bytes:
    """One item on its own, for ``join``: the uplink packs each item once (and may spool it)."""
    return msgpack.packb([kind, seq, t, body], use_bin_type=True)  # type: ignore[no-any-return]


def pack_header(envelope: dict[str, Any]) -> bytes:
    """The bytes of a message before its items, for ``join``."""
    packed: bytes = msgpack.packb([UPLINK_VERSION, envelope], use_bin_type=True)
    return b"\x93" + packed[1:]  # the same two values, in a three-element array


def join(header: bytes, packed_items: Sequence[bytes]) -> bytes:
    """A message from ``pack_header`` and ``pack_item`` parts, the same bytes ``encode`` makes."""
    count = len(packed_items)
    if count < 16:
        array = bytes((0x90 | count,))
    elif count < 65536:
        array = b"\xdc" + struct.pack(">H", count)
    else:
        array = b"\xdd" + struct.pack(">I", count)
    return b"".join((header, array, *packed_items))


def decode(raw: bytes) -> UplinkMessage:
    """Decode and check one message; raises Rejected, and nothing else, for a bad one."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise Rejected("oversized", f"{len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        message = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=False,  # a non-string key costs its item only (checked below)
            max_str_len=MAX_STRING_BYTES,
            max_bin_len=MAX_STRING_BYTES,
            max_array_len=MAX_CONTAINER,
            max_map_len=MAX_CONTAINER,
        )
    except Exception as exc:  # msgpack raises a variety for truncated or garbled input
        raise Rejected("malformed", f"{type(exc).__name__}: {exc}") from None
    if type(message) is not list or len(message) != 3:
        raise Rejected("malformed", "not a [version, envelope, items] array")
    version, envelope, items = message
    if type(version) is not int or version != UPLINK_VERSION:
        raise Rejected(
            "bad_version", f"uplink version {version!r:.40}, this reads {UPLINK_VERSION}"
        )
    _check_envelope(envelope)
    if type(items) is not list or len(items) > MAX_ITEMS:
        raise Rejected("malformed", f"items is not an array of at most {MAX_ITEMS}")
    decoded = UplinkMessage({key: envelope[key] for key in ENVELOPE_KEYS}, [])
    for raw_item in items:
        try:
            decoded.items.append(check_item(raw_item))
        except Rejected as rejected:
            decoded.rejected.append((rejected.reason, rejected.detail))
    return decoded


def _check_envelope(envelope: Any) -> None:
    if type(envelope) is not dict:
        raise Rejected("bad_envelope", "envelope is not a map")
    job = envelope.get("job")
    if type(job) is not str or not RUN_ID.match(job):
        raise Rejected("bad_envelope", f"job {job!r:.140} is not [A-Za-z0-9._-], 1-128 chars")
    node = envelope.get("node")
    if type(node) is not str or not 0 < len(node) <= MAX_NAME_CHARS:
        raise Rejected("bad_envelope", f"node must be a string of 1-{MAX_NAME_CHARS} chars")
    agent = envelope.get("agent")
    if type(agent) is not str or not STREAM_ID.match(agent):
        raise Rejected("bad_envelope", f"agent id {agent!r:.80} is not [A-Za-z0-9._-], 1-64 chars")
    pid = envelope.get("pid")
    if type(pid) is not int or not 0 <= pid <= MAX_COUNT:
        raise Rejected("bad_envelope", "pid must be a non-negative integer")


def check_item(item: Any) -> Item:
    """One ``[kind, seq, t, body]`` checked; Rejected names what is wrong with it."""
    if type(item) is not list or len(item) != 4:
        raise Rejected("bad_item", "item is not [kind, seq, t, body]")
    kind, seq, t, body = item
    if type(kind) is not str or kind not in KINDS:
        raise Rejected("unknown_kind", f"unknown kind {kind!r:.80}")
    if type(seq) is not int or not 0 <= seq <= MAX_COUNT:
        raise Rejected("bad_item", f"seq {seq!r:.40} is not an integer in 0..2**53-1")
    if type(t) not in (float, int) or not math.isfinite(t):
        raise Rejected("bad_item", "t is not a finite number")
    if type(body) is not dict:
        raise Rejected("bad_item", "body is not a map")
    _check_plain(body, 0)
    if kind in COUNTER_KINDS:
        _check_counters(body.get("uplink"))
    if kind == RECORDS and type(body.get("entries")) is not list:
        raise Rejected("bad_item", "a records body needs an entries array")
    if kind == ACCOUNTING:
        streams = body.get("streams")
        if type(streams) is not list or any(type(s) is not dict for s in streams):
            raise Rejected("bad_item", "an accounting body needs a streams array of maps")
    return Item(kind, seq, float(t), body)


def _check_counters(uplink: Any) -> None:
    """``{"produced": count, "dropped": {reason: count}}``: the stream's own counters."""
    if type(uplink) is not dict or not _is_count(uplink.get("produced")):
        raise Rejected("bad_item", "uplink counters need produced, a count in 0..2**53-1")
    dropped = uplink.get("dropped", {})
    if (
        type(dropped) is not dict
        or not all(type(k) is str and _is_count(v) for k, v in dropped.items())
        or sum(dropped.values()) > MAX_COUNT
    ):
        raise Rejected("bad_item", "uplink dropped must map reasons to counts")


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


_PLAIN_SCALARS = (str, int, float, bool, type(None))


def _check_plain(value: Any, depth: int) -> None:
    """JSON-like values only (the aggregator stores them as JSON), bounded in depth."""
    if depth > MAX_DEPTH:
        raise Rejected("bad_item", f"nested deeper than {MAX_DEPTH}")
    kind = type(value)
    if kind is dict:
        for key, inner in value.items():
            if type(key) is not str:
                raise Rejected("bad_item", "map keys must be strings")
            _check_plain(inner, depth + 1)
    elif kind is list:
        for inner in value:
            _check_plain(inner, depth + 1)
    elif kind is int:
        if not -(2**63) <= value < 2**64:
            raise Rejected("bad_item", "integers must fit in 64 bits")
    elif kind not in _PLAIN_SCALARS:
        raise Rejected("bad_item", f"{kind.__name__} values are not allowed here")
