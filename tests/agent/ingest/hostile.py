"""Hypothesis strategies for the wire format: well-formed records of every kind, hostile
values for every field, and whole messages mixing the two (docs/protocol.md).

Shared by the decoder's property tests and the end-to-end ones against a real agent.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
from hypothesis import strategies as st

from agent.ingest.decode import TENSOR_DTYPES, Message, Record
from probe import protocol

INT64 = 2**63
UINT64 = 2**64
#: reasons a whole message is refused, and the one a single record is refused for
MESSAGE_REASONS = frozenset({"oversized", "malformed", "bad_version", "bad_envelope"})
RECORD_REASONS = frozenset({"bad_record"})

_utf8 = st.characters(codec="utf-8")
names = st.text(_utf8, min_size=1, max_size=protocol.MAX_NAME_CHARS)
#: any integer msgpack can carry
wire_ints = st.integers(min_value=-INT64, max_value=UINT64 - 1)
int64s = st.integers(min_value=-INT64, max_value=INT64 - 1)
counts = st.integers(min_value=0, max_value=2**40)


def plain(depth: int = 3) -> st.SearchStrategy[Any]:
    """JSON-like values (configs, event attributes) nested at most ``depth`` levels."""
    leaf = st.none() | st.booleans() | int64s | st.floats() | st.text(_utf8, max_size=20)
    if depth == 0:
        return leaf
    inner = plain(depth - 1)
    return (
        leaf
        | st.lists(inner, max_size=3)
        | st.dictionaries(st.text(_utf8, max_size=8), inner, max_size=3)
    )


#: any value msgpack can carry, extension types included
anything = st.recursive(
    st.none()
    | st.booleans()
    | wire_ints
    | st.floats()
    | st.text(_utf8, max_size=40)
    | st.binary(max_size=40)
    | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(_utf8, max_size=8) | wire_ints, inner, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def tensor_body(draw: st.DrawFn) -> dict[str, Any]:
    dtype = draw(st.sampled_from(sorted(TENSOR_DTYPES)))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    data = draw(
        st.binary(
            min_size=math.prod(shape) * TENSOR_DTYPES[dtype],
            max_size=math.prod(shape) * TENSOR_DTYPES[dtype],
        )
    )
    body: dict[str, Any] = {"name": draw(names), "dtype": dtype, "shape": shape, "data": data}
    if draw(st.booleans()):
        body["as"] = "histogram"
        body["bins"] = draw(st.integers(1, 512))
    return body


def _counters() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "produced": counts,
            "sent": counts,
            "dropped": st.dictionaries(st.sampled_from(protocol.DROP_REASONS), counts),
            "invalid_values": counts,
            "internal_errors": counts,
        },
    )


BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    protocol.SCALARS: st.dictionaries(
        names,
        st.floats() | int64s,
        min_size=1,
        max_size=12,
    ),
    protocol.TENSOR: tensor_body(),
    protocol.TEXT: st.fixed_dictionaries({"name": names, "text": st.text(_utf8, max_size=200)}),
    protocol.EVENT: st.fixed_dictionaries(
        {"name": names},
        optional={"attrs": st.dictionaries(st.text(_utf8, max_size=8), plain(2), max_size=3)},
    ),
    protocol.CONFIG: st.fixed_dictionaries(
        {"params": st.dictionaries(st.text(_utf8, max_size=8), plain(3), max_size=4)}
    ),
    protocol.HELLO: st.dictionaries(st.text(_utf8, min_size=1, max_size=10), plain(2), max_size=4),
    protocol.HEARTBEAT: st.just({}),
    protocol.PROBE_STATS: _counters(),
    protocol.BYE: _counters(),
    protocol.RUN_END: st.fixed_dictionaries(
        {},
        optional={"exit_status": st.none() | st.integers(-255, 255), "end_time": st.floats(0, 2e9)},
    ),
}


@st.composite
def good_record(draw: st.DrawFn, kinds: tuple[str, ...] = tuple(BODIES)) -> list[Any]:
    """A record every documented check accepts."""
    kind = draw(st.sampled_from(kinds))
    seq = draw(st.integers(0, INT64 - 2))
    t = draw(st.floats(allow_nan=False, allow_infinity=False))
    step = draw(st.none() | int64s)
    return [kind, seq, t, step, draw(BODIES[kind])]


@st.composite
def spoiled_record(draw: st.DrawFn) -> Any:
    """A good record with one field (or one body value) replaced by anything, or garbage."""
    record = draw(good_record())
    how = draw(st.sampled_from(["field", "body", "extra", "short", "garbage"]))
    if how == "field":
        record[draw(st.integers(0, 4))] = draw(anything)
    elif how == "body" and record[4]:
        key = draw(st.sampled_from(sorted(record[4], key=repr)))
        record[4][key] = draw(anything)
    elif how == "extra":
        record.append(draw(anything))
    elif how == "short":
        record = record[: draw(st.integers(0, 4))]
    else:
        return draw(anything)
    return record


def envelope(run: str = "fuzz", stream: str = "fuzz") -> dict[str, Any]:
    return {
        "run": run,
        "stream": stream,
        "rank": 0,
        "local_rank": 0,
        "world_size": 1,
        "host": "fuzzhost",
        "pid": 1,
    }


@st.composite
def spoiled_envelope(draw: st.DrawFn, run: str = "fuzz") -> Any:
    env: Any = envelope(run)
    how = draw(st.sampled_from(["value", "missing", "extra", "garbage"]))
    key = draw(st.sampled_from(protocol.ENVELOPE_KEYS))
    if how == "value":
        env[key] = draw(anything)
    elif how == "missing":
        del env[key]
    elif how == "extra":
        env[draw(st.text(_utf8, max_size=8))] = draw(anything)
    else:
        env = draw(anything)
    return env


def pack(version: Any, env: Any, records: Any) -> bytes:
    return msgpack.packb([version, env, records], use_bin_type=True)  # type: ignore[no-any-return]


@st.composite
def hostile_message(draw: st.DrawFn, runs: tuple[str, ...] = ("fuzz",)) -> bytes:
    """One message of any kind of trouble (or none): garbage bytes, a bomb, a bad version
    or envelope, good and spoiled records mixed, a truncated or bit-flipped good message."""
    run = draw(st.sampled_from(runs))
    stream = draw(st.sampled_from(["fuzz-a", "fuzz-b"]))
    records = draw(st.lists(good_record() | spoiled_record(), max_size=6))
    whole = pack(protocol.VERSION, envelope(run, stream), records)
    how = draw(
        st.sampled_from(
            # mixed three times over: most records of a real attack sit in a good envelope
            ["mixed"] * 3
            + ["bytes", "anything", "version", "envelope", "truncated", "flipped", "bomb"]
        )
    )
    if how == "mixed":
        return whole
    if how == "bytes":
        return draw(st.binary(max_size=200))
    if how == "anything":
        return msgpack.packb(draw(anything), use_bin_type=True)  # type: ignore[no-any-return]
    if how == "version":
        return pack(
            draw(anything.filter(lambda v: v != 1 or type(v) is not int)),
            envelope(run, stream),
            records,
        )
    if how == "envelope":
        return pack(protocol.VERSION, draw(spoiled_envelope(run)), records)
    if how == "truncated":
        return whole[: draw(st.integers(0, max(0, len(whole) - 1)))]
    if how == "flipped":
        data = bytearray(whole)
        for _ in range(draw(st.integers(1, 4))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    return draw(st.sampled_from(BOMBS))


def _prefix(run: str = "fuzz") -> bytes:
    """The bytes of ``[1, envelope, `` : a bomb after them sits where the records go."""
    return b"\x93\x01" + msgpack.packb(envelope(run))


#: msgpack bombs: headers that claim far more than the message holds, or nest far too deep
BOMBS: tuple[bytes, ...] = (
    _prefix() + b"\xdd\xff\xff\xff\xff",  # array32 claiming 2**32 - 1 records
    _prefix() + b"\xdf\xff\xff\xff\xff",  # map32 claiming 2**32 - 1 pairs
    _prefix() + b"\x91\x95\xa7scalars\x00\xcb" + bytes(8) + b"\x00\xde\xff\xff\xa1a",  # map16 short
    _prefix() + b"\x91\xdb\xff\xff\xff\xff",  # str32 claiming 4 GiB
    _prefix() + b"\x91\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
    _prefix() + b"\x91\xc9\xff\xff\xff\xff\x01",  # ext32 claiming 4 GiB
    b"\xdd\xff\xff\xff\xff",  # the whole message an array32 of 2**32 - 1
    b"\x93\x01" + b"\x91" * 100_000 + b"\xc0",  # nested 100,000 deep as the envelope
    _prefix() + b"\x91" * 100_000 + b"\xc0",  # ... and as the records
    _prefix()
    + b"\x91\x95\xa5event\x00\xcb"
    + bytes(8)
    + b"\xc0\x81\xa5attrs"
    + b"\x81\xa1k" * 64
    + b"\xc0",
)


def record_problems(record: Record) -> list[str]:
    """What docs/protocol.md forbids in an accepted record (empty: nothing)."""
    problems = []
    if record.kind not in protocol.KINDS:
        problems.append(f"kind {record.kind!r}")
    if type(record.seq) is not int or record.seq < 0:
        problems.append(f"seq {record.seq!r}")
    if type(record.t) is not float or not math.isfinite(record.t):
        problems.append(f"t {record.t!r}")
    if record.step is not None and type(record.step) is not int:
        problems.append(f"step {record.step!r}")
    body = record.body
    if type(body) is not dict or any(type(key) is not str for key in body):
        return [*problems, "body is not a map with string keys"]
    if record.kind == protocol.SCALARS:
        if len(body) > protocol.MAX_METRICS_PER_RECORD:
            problems.append("too many metrics")
        for name, value in body.items():
            if not 0 < len(name) <= protocol.MAX_NAME_CHARS:
                problems.append(f"metric name of {len(name)} chars")
            if type(value) not in (int, float):
                problems.append(f"metric value {value!r}")
        return problems
    if record.kind == protocol.TENSOR:
        dtype, shape, data = body.get("dtype"), body.get("shape"), body.get("data")
        if dtype not in TENSOR_DTYPES or type(shape) is not list or type(data) is not bytes:
            return [*problems, "tensor fields"]
        if len(shape) > 8 or math.prod(shape) * TENSOR_DTYPES[dtype] != len(data):
            problems.append("tensor shape does not match its data")
    if record.kind == protocol.TEXT and len(body.get("text", "")) > protocol.MAX_TEXT_CHARS:
        problems.append("text too long")
    for key, value in body.items():
        if not (record.kind == protocol.TENSOR and key == "data"):
            problems.extend(_plain_problems(value, 0, key))
    return problems


def _plain_problems(value: Any, depth: int, where: str) -> list[str]:
    if depth > 8:
        return [f"{where}: nested deeper than 8"]
    if type(value) is dict:
        out = []
        for key, item in value.items():
            if type(key) is not str:
                out.append(f"{where}: key {key!r}")
            out.extend(_plain_problems(item, depth + 1, where))
        return out
    if type(value) is list:
        return [p for item in value for p in _plain_problems(item, depth + 1, where)]
    if type(value) not in (str, int, float, bool, type(None)):
        return [f"{where}: {type(value).__name__}"]
    return []


def outcome(message: Message) -> tuple[int, dict[str, int]]:
    """(good records, rejected records by reason) of a decoded message."""
    reasons: dict[str, int] = {}
    for reason, _ in message.rejected:
        reasons[reason] = reasons.get(reason, 0) + 1
    return len(message.records), reasons
