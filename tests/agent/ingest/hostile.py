"""Hypothesis strategies for the wire format: well-formed records and scalar blocks of every
kind, hostile values for every field, and whole messages mixing the two (docs/protocol.md).

Shared by the decoder's property tests and the end-to-end ones against a real agent.
"""

from __future__ import annotations

import math
from typing import Any

import msgpack
from hypothesis import strategies as st

from agent.ingest.decode import TENSOR_DTYPES, Record, ScalarRows
from probe import protocol

#: what docs/protocol.md allows, written out here so the decoder is checked against the
#: documentation, not against itself: seqs and probe counts are 0..2**53-1, steps 64-bit
MAX_COUNT = 2**53 - 1
INT64 = 2**63
UINT64 = 2**64
#: integers at and just past those bounds
EDGE_INTS = (-1, 0, MAX_COUNT, MAX_COUNT + 1, INT64 - 1, INT64, UINT64 - 1, -INT64)
EDGE_BINS = (0, 1, protocol.MAX_HISTOGRAM_BINS, protocol.MAX_HISTOGRAM_BINS + 1, -1, 2**40)
#: reasons a whole message is refused, and the one a single record is refused for
MESSAGE_REASONS = frozenset({"oversized", "malformed", "bad_version", "bad_envelope"})
RECORD_REASONS = frozenset({"bad_record"})

_utf8 = st.characters(codec="utf-8")
names = st.text(_utf8, min_size=1, max_size=protocol.MAX_NAME_CHARS)
#: any integer msgpack can carry
wire_ints = st.integers(min_value=-INT64, max_value=UINT64 - 1)
int64s = st.integers(min_value=-INT64, max_value=INT64 - 1)
counts = st.integers(min_value=0, max_value=MAX_COUNT)
seqs = counts
steps = st.none() | int64s
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
metric_values = st.floats() | int64s


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


@st.composite
def dropped(draw: st.DrawFn) -> dict[str, int]:
    """Drop counts by reason whose sum is a count too (run.json adds them up)."""
    reasons = draw(st.lists(st.sampled_from(protocol.DROP_REASONS), unique=True))
    out: dict[str, int] = {}
    left = MAX_COUNT
    for reason in reasons:
        out[reason] = draw(st.integers(0, left))
        left -= out[reason]
    return out


def _counters() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "produced": counts,
            "sent": counts,
            "dropped": dropped(),
            "invalid_values": counts,
            "internal_errors": counts,
        },
    )


BODIES: dict[str, st.SearchStrategy[dict[str, Any]]] = {
    protocol.SCALARS: st.dictionaries(names, metric_values, min_size=1, max_size=12),
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
    return [kind, draw(seqs), draw(finite_floats), draw(steps), draw(BODIES[kind])]


@st.composite
def edge_record(draw: st.DrawFn) -> list[Any]:
    """A good record with a seq, a step, a probe counter, a drop count or a histogram's bins
    at the edge of its range, or just past it."""
    record = draw(good_record())
    where = draw(st.sampled_from(["seq", "step", "counter", "dropped", "bins"]))
    value = draw(st.sampled_from(EDGE_INTS))
    if where == "seq":
        record[1] = value
    elif where == "step":
        record[3] = value
    elif where == "bins":
        record[0], record[4] = protocol.TENSOR, draw(tensor_body())
        record[4].update({"as": "histogram", "bins": draw(st.sampled_from(EDGE_BINS))})
    else:
        record[0] = draw(st.sampled_from([protocol.BYE, protocol.PROBE_STATS]))
        if where == "counter":
            key = draw(st.sampled_from(["produced", "invalid_values", "internal_errors"]))
            record[4] = {key: value}
        else:
            record[4] = {"dropped": {"queue_full": value, "no_agent": draw(counts)}}
    return record


@st.composite
def spoiled_record(draw: st.DrawFn) -> Any:
    """A good record with one field (or one body value) replaced by anything or by an
    integer at the edge of its range, or garbage."""
    how = draw(st.sampled_from(["field", "body", "number", "extra", "short", "garbage"]))
    if how == "number":
        return draw(edge_record())
    record = draw(good_record())
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


@st.composite
def good_block(draw: st.DrawFn, max_rows: int = 6) -> list[Any]:
    """A scalar block of version 2, ``[SCALAR_ROWS, names, seqs, ts, steps, rows]``, that
    every documented check accepts."""
    metric_names = draw(st.lists(names, min_size=1, max_size=6, unique=True))
    rows = draw(st.integers(1, max_rows))

    def column(of: st.SearchStrategy[Any]) -> Any:
        return draw(st.lists(of, min_size=rows, max_size=rows))

    width = len(metric_names)
    return [
        protocol.SCALAR_ROWS,
        metric_names,
        column(seqs),
        column(finite_floats),
        column(steps),
        column(st.lists(metric_values, min_size=width, max_size=width)),
    ]


@st.composite
def edge_block(draw: st.DrawFn) -> list[Any]:
    """A good block with a seq or a step at the edge of its range, or just past it."""
    block = draw(good_block())
    column = draw(st.sampled_from([2, 4]))  # seqs or steps
    block[column][draw(st.integers(0, len(block[2]) - 1))] = draw(st.sampled_from(EDGE_INTS))
    return block


@st.composite
def spoiled_block(draw: st.DrawFn) -> Any:
    """A good block spoiled in one place: a column, an element or a value replaced by
    anything, a seq or step at or past its bounds, columns of unequal length, a row of the
    wrong width, a duplicated, empty or long name, or one field too many or too few."""
    how = draw(
        st.sampled_from(["column", "cell", "value", "number", "length", "width", "name", "shape"])
    )
    if how == "number":
        return draw(edge_block())
    block = draw(good_block())
    rows = len(block[2])
    if how == "column":  # the kind or a whole column
        block[draw(st.integers(0, 5))] = draw(anything)
    elif how == "cell":  # one name, seq, t, step or row
        cells = block[draw(st.integers(1, 5))]
        cells[draw(st.integers(0, len(cells) - 1))] = draw(anything)
    elif how == "value":
        row = block[5][draw(st.integers(0, rows - 1))]
        row[draw(st.integers(0, len(row) - 1))] = draw(anything | st.booleans() | st.none())
    elif how == "length":  # ts, steps or rows one longer or shorter than seqs
        cells = block[draw(st.integers(3, 5))]
        if draw(st.booleans()):
            cells.pop()
        else:
            cells.append(cells[0])
    elif how == "width":
        row = block[5][draw(st.integers(0, rows - 1))]
        if draw(st.booleans()):
            row.pop()
        else:
            row.append(1.0)
    elif how == "name":  # empty, too long, or another's
        metric_names = block[1]
        where = draw(st.integers(0, len(metric_names) - 1))
        others = [name for name in metric_names if name != metric_names[where]]
        bad = ["", "x" * (protocol.MAX_NAME_CHARS + 1), *others]
        metric_names[where] = draw(st.sampled_from(bad))
    elif draw(st.booleans()):
        block.append(draw(anything))
    else:
        block.pop()
    return block


def records_in(record: Any, version: int = protocol.VERSION) -> int:
    """How many records one element of a message's records array stands for: a block of
    version 2 (six elements), accepted or refused, counts each of its seqs (one when they
    are not an array of 1..4,096); anything else is one record."""
    if version >= 2 and type(record) is list and len(record) == 6:
        column = record[2]
        if type(column) is list and 0 < len(column) <= protocol.MAX_RECORDS_PER_MESSAGE:
            return len(column)
    return 1


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


def wide_block(rows: int, first_seq: int = 0) -> list[Any]:
    """A good block of ``rows`` records of one metric."""
    return [
        protocol.SCALAR_ROWS,
        ["loss"],
        list(range(first_seq, first_seq + rows)),
        [1.0] * rows,
        list(range(rows)),
        [[0.5]] * rows,
    ]


#: anything that can sit in a message's records array
any_record = good_record() | spoiled_record() | good_block() | spoiled_block()


@st.composite
def hostile_message(draw: st.DrawFn, runs: tuple[str, ...] = ("fuzz",)) -> bytes:
    """One message of any kind of trouble (or none): garbage bytes, a bomb, a bad version
    or envelope, good and spoiled records and blocks mixed, blocks in a version 1 message,
    blocks past the record limit, a truncated or bit-flipped good message."""
    run = draw(st.sampled_from(runs))
    stream = draw(st.sampled_from(["fuzz-a", "fuzz-b"]))
    records = draw(st.lists(any_record, max_size=6))
    whole = pack(protocol.VERSION, envelope(run, stream), records)
    how = draw(
        st.sampled_from(
            # mixed three times over: most records of a real attack sit in a good envelope
            ["mixed"] * 3
            + ["bytes", "anything", "version", "envelope", "truncated", "flipped", "bomb"]
            + ["version_1", "overfull"]
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
            draw(anything.filter(lambda v: type(v) is not int or v not in (1, 2))),
            envelope(run, stream),
            records,
        )
    if how == "envelope":
        return pack(protocol.VERSION, draw(spoiled_envelope(run)), records)
    if how == "version_1":  # a block in it is one bad record
        return pack(1, envelope(run, stream), records)
    if how == "overfull":  # plain records and a block: at the record limit, one past, or more
        lead = draw(st.lists(good_record((protocol.SCALARS,)), max_size=2))
        limit = protocol.MAX_RECORDS_PER_MESSAGE - len(lead)
        rows = draw(st.sampled_from([limit, limit + 1, protocol.MAX_RECORDS_PER_MESSAGE + 1]))
        return pack(protocol.VERSION, envelope(run, stream), [*lead, wide_block(rows)])
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


def problems(item: Record | ScalarRows) -> list[str]:
    """What docs/protocol.md forbids in an accepted record or block (empty: nothing)."""
    return block_problems(item) if isinstance(item, ScalarRows) else record_problems(item)


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


def _is_step(value: Any) -> bool:
    return value is None or (type(value) is int and -INT64 <= value < INT64)


def _is_metric_name(name: Any) -> bool:
    return type(name) is str and 0 < len(name) <= protocol.MAX_NAME_CHARS


def record_problems(record: Record) -> list[str]:
    """What docs/protocol.md forbids in an accepted record (empty: nothing)."""
    problems = []
    if record.kind not in protocol.KINDS:
        problems.append(f"kind {record.kind!r}")
    if not _is_count(record.seq):
        problems.append(f"seq {record.seq!r}")
    if type(record.t) is not float or not math.isfinite(record.t):
        problems.append(f"t {record.t!r}")
    if not _is_step(record.step):
        problems.append(f"step {record.step!r}")
    body = record.body
    if type(body) is not dict or any(type(key) is not str for key in body):
        return [*problems, "body is not a map with string keys"]
    if record.kind == protocol.SCALARS:
        if len(body) > protocol.MAX_METRICS_PER_RECORD:
            problems.append("too many metrics")
        for name, value in body.items():
            if not _is_metric_name(name):
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
        bins = body.get("bins")
        if bins is not None and (type(bins) is not int or not 1 <= bins <= 512):
            problems.append(f"histogram bins {bins!r}")
    if record.kind in (protocol.PROBE_STATS, protocol.BYE):
        problems.extend(_counter_problems(body))
    if record.kind == protocol.TEXT and len(body.get("text", "")) > protocol.MAX_TEXT_CHARS:
        problems.append("text too long")
    for key, value in body.items():
        if not (record.kind == protocol.TENSOR and key == "data"):
            problems.extend(_plain_problems(value, 0, key))
    return problems


def _counter_problems(body: dict[str, Any]) -> list[str]:
    out = [
        f"{key} {body[key]!r}"
        for key in ("produced", "invalid_values", "internal_errors")
        if key in body and not _is_count(body[key])
    ]
    dropped = body.get("dropped", {})
    if type(dropped) is not dict or not all(map(_is_count, dropped.values())):
        out.append(f"dropped {dropped!r:.80}")
    elif sum(dropped.values()) > MAX_COUNT:
        out.append("drops adding up past 2**53-1")
    return out


def block_problems(block: ScalarRows) -> list[str]:
    """What docs/protocol.md forbids in an accepted scalar block (empty: nothing)."""
    problems = []
    rows = len(block.seqs)
    if not 0 < rows <= protocol.MAX_RECORDS_PER_MESSAGE:
        problems.append(f"{rows} records")
    if not 0 < len(block.names) <= protocol.MAX_METRICS_PER_RECORD:
        problems.append(f"{len(block.names)} names")
    if not all(map(_is_metric_name, block.names)) or len(set(block.names)) != len(block.names):
        problems.append(f"names {block.names!r:.80}")
    if not len(block.ts) == len(block.steps) == len(block.rows) == rows:
        problems.append("columns of unequal length")
    if not all(map(_is_count, block.seqs)):
        problems.append(f"seqs {block.seqs!r:.80}")
    if not all(type(t) is float and math.isfinite(t) for t in block.ts):
        problems.append(f"ts {block.ts!r:.80}")
    if not all(map(_is_step, block.steps)):
        problems.append(f"steps {block.steps!r:.80}")
    for row in block.rows:
        if type(row) is not list or len(row) != len(block.names):
            problems.append(f"row {row!r:.80}")
        elif any(type(value) not in (int, float) for value in row):
            problems.append(f"values {row!r:.80}")
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
