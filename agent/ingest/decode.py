"""Turning bytes from the socket into validated records, with hard limits.

Anything can arrive on the agent's socket. A message that cannot be decoded,
or whose envelope is wrong, is rejected whole; a record with a bad shape is
rejected alone and the good records around it are kept (a scalar block of
version 2 is refused whole, each of its records counted). Each rejection names
a reason, which the agent counts.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Any

import msgpack

from probe import protocol

#: steps are 64-bit integers wherever they go (TensorBoard's steps are int64)
INT64 = 2**63 - 1
INT64_MIN = -(2**63)
#: seqs and counts are added up across streams in run.json: integers any JSON reader holds
#: exactly, so thousands of streams still sum within 64 bits
MAX_COUNT = 2**53 - 1
MAX_BINS = protocol.MAX_HISTOGRAM_BINS
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # it becomes a directory name
STREAM_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_NESTING = 8
MAX_CONTAINER = 4096


class Rejected(Exception):
    """A whole message was refused; ``reason`` is the counter it goes to."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Record:
    kind: str
    seq: int
    t: float
    step: int | None
    body: dict[str, Any]


@dataclass(slots=True)
class ScalarRows:
    """A checked scalar block: ``scalars`` records that share their metric names.

    Kept as columns until the run store writes its lines, so no per-record
    object is made on the way there.
    """

    names: list[str]
    seqs: list[int]
    ts: list[float]
    steps: list[int | None]
    rows: list[list[float | int]]
    top_seq: int  # the highest of ``seqs`` and of the steps, found by the checks
    top_step: int | None
    kind: str = protocol.SCALAR_ROWS

    def __len__(self) -> int:
        return len(self.seqs)


@dataclass
class Message:
    """One wire message after validation: its stream's envelope, the good records, and why
    each bad one was refused. ``count`` is how many records the good ones stand for (a
    scalar block counts its rows)."""

    envelope: dict[str, Any]
    records: list[Record | ScalarRows]
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail) per record
    count: int = 0


def decode(raw: bytes) -> Message:
    """Decode and validate one message; raises Rejected for a message-level fault."""
    if len(raw) > protocol.MAX_MESSAGE_BYTES:
        raise Rejected("oversized", f"{len(raw)} bytes > {protocol.MAX_MESSAGE_BYTES}")
    try:
        message = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=False,  # a non-string key costs its record only (checked below)
            max_str_len=protocol.MAX_TEXT_CHARS * 4,
            max_bin_len=protocol.MAX_TENSOR_BYTES,
            max_array_len=max(protocol.MAX_RECORDS_PER_MESSAGE, MAX_CONTAINER),
            max_map_len=max(protocol.MAX_METRICS_PER_RECORD, MAX_CONTAINER),
        )
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise Rejected("malformed", f"{type(exc).__name__}: {exc}") from None
    except Exception as exc:  # msgpack raises a variety for truncated/garbled input
        raise Rejected("malformed", f"{type(exc).__name__}: {exc}") from None
    if type(message) is not list or len(message) != 3:
        raise Rejected("malformed", "not a [version, envelope, records] array")
    version, envelope, records = message
    if type(version) is not int or version not in protocol.READABLE_VERSIONS:
        readable = ", ".join(map(str, sorted(protocol.READABLE_VERSIONS)))
        raise Rejected("bad_version", f"protocol version {version!r}, this agent reads {readable}")
    _check_envelope(envelope)
    if type(records) is not list or len(records) > protocol.MAX_RECORDS_PER_MESSAGE:
        raise Rejected("malformed", "records is not a bounded array")
    # Only the known keys go on: the envelope is written to the store as the stream's source.
    decoded = Message({key: envelope[key] for key in protocol.ENVELOPE_KEYS}, [])
    for key, default in protocol.OPTIONAL_ENVELOPE.items():
        decoded.envelope[key] = envelope.get(key, default)
    good = decoded.records
    known = _KNOWN_NAMES
    blocks = version >= 2
    count = 0  # records kept so far, a block's rows included
    for raw_record in records:
        if blocks and type(raw_record) is list and len(raw_record) == 6:
            # The hot path of version 2: a block of scalars records, checked whole.
            try:
                block = _scalar_rows(raw_record, protocol.MAX_RECORDS_PER_MESSAGE - count)
            except Rejected as rejected:
                refused = _row_count(raw_record)
                decoded.rejected.extend([(rejected.reason, rejected.detail)] * refused)
                continue
            good.append(block)
            count += len(block.seqs)
            continue
        # The hot path of version 1: a well-formed scalars record with metric names seen before.
        if type(raw_record) is list and len(raw_record) == 5:
            kind, seq, t, step, body = raw_record
            if (
                kind == SCALARS
                and type(seq) is int
                and 0 <= seq <= MAX_COUNT
                and type(t) is float
                and -math.inf < t < math.inf
                and (step is None or (type(step) is int and INT64_MIN <= step <= INT64))
                and type(body) is dict
                and len(body) <= protocol.MAX_METRICS_PER_RECORD
                and known.issuperset(body)
                and _NUMBER_TYPES.issuperset(map(type, body.values()))
            ):
                good.append(Record(kind, seq, t, step, body))
                count += 1
                continue
        try:
            good.append(_check_record(raw_record))
            count += 1
        except Rejected as rejected:
            decoded.rejected.append((rejected.reason, rejected.detail))
    decoded.count = count
    return decoded


def _scalar_rows(block: list[Any], room: int) -> ScalarRows:
    """One block ``[SCALAR_ROWS, names, seqs, ts, steps, rows]``, checked.

    Every check runs over whole arrays (in C), so a block of 512 records costs
    little more than one record; a block with any fault is refused whole.
    """
    kind, names, seqs, ts, steps, rows = block
    if kind != protocol.SCALAR_ROWS:
        raise Rejected("bad_record", f"a 6-element record must be a {protocol.SCALAR_ROWS} block")
    if (
        type(names) is not list
        or not 0 < len(names) <= protocol.MAX_METRICS_PER_RECORD
        or not _NAME_TYPES.issuperset(map(type, names))
        or min(map(len, names)) == 0
        or max(map(len, names)) > protocol.MAX_NAME_CHARS
        or len(set(names)) != len(names)
    ):
        raise Rejected(
            "bad_record",
            f"block names must be 1-{protocol.MAX_METRICS_PER_RECORD} distinct strings of "
            f"1-{protocol.MAX_NAME_CHARS} chars",
        )
    count = len(seqs) if type(seqs) is list else -1
    if not 0 < count <= room:
        raise Rejected("bad_record", f"a block holds 1 to {room} records here, not {count}")
    if not (type(ts) is list and type(steps) is list and type(rows) is list) or not (
        len(ts) == len(steps) == len(rows) == count
    ):
        raise Rejected("bad_record", "block seqs, ts, steps and rows must be arrays of one length")
    if not _INT_TYPES.issuperset(map(type, seqs)) or min(seqs) < 0 or max(seqs) > MAX_COUNT:
        raise Rejected("bad_record", "block seqs must be integers in 0..2**53-1")
    if not _FLOAT_TYPES.issuperset(map(type, ts)) or not all(map(math.isfinite, ts)):
        raise Rejected("bad_record", "block ts must be finite floats")
    if not _STEP_TYPES.issuperset(map(type, steps)):
        raise Rejected("bad_record", "block steps must be integers or nil")
    known = steps if None not in steps else [step for step in steps if step is not None]
    if known and (min(known) < INT64_MIN or max(known) > INT64):
        raise Rejected("bad_record", "block steps must be 64-bit integers or nil")
    width = len(names)
    if not _LIST_TYPES.issuperset(map(type, rows)) or {width} != set(map(len, rows)):
        raise Rejected("bad_record", f"every block row must be an array of {width} values")
    if not _NUMBER_TYPES.issuperset(map(type, itertools.chain.from_iterable(rows))):
        raise Rejected("bad_record", "block values must be numbers")
    top_step = max(known) if known else None
    return ScalarRows(names, seqs, ts, steps, rows, max(seqs), top_step)


def _row_count(block: list[Any]) -> int:
    """How many records a refused block stood for (1 when even that cannot be told)."""
    seqs = block[2]
    if type(seqs) is list and 0 < len(seqs) <= protocol.MAX_RECORDS_PER_MESSAGE:
        return len(seqs)
    return 1


def _check_envelope(envelope: Any) -> None:
    if type(envelope) is not dict:
        raise Rejected("bad_envelope", "envelope is not a map")
    run = envelope.get("run")
    if type(run) is not str or not RUN_ID.match(run):
        raise Rejected("bad_envelope", f"run id {run!r} is not [A-Za-z0-9._-], 1-128 chars")
    stream = envelope.get("stream")
    if type(stream) is not str or not STREAM_ID.match(stream):
        raise Rejected("bad_envelope", f"stream id {stream!r} is invalid")
    for key in ("rank", "local_rank", "world_size", "pid"):
        if type(envelope.get(key)) is not int:
            raise Rejected("bad_envelope", f"{key} must be an integer")
    host = envelope.get("host")
    if type(host) is not str or len(host) > protocol.MAX_NAME_CHARS:
        raise Rejected("bad_envelope", "host must be a short string")
    restart = envelope.get("restart", 0)
    if type(restart) is not int or not 0 <= restart <= MAX_COUNT:
        raise Rejected("bad_envelope", "restart must be a non-negative integer")


def _check_record(record: Any) -> Record:
    if type(record) is not list or len(record) != 5:
        raise Rejected("bad_record", "record is not [kind, seq, t, step, body]")
    kind, seq, t, step, body = record
    if type(seq) is not int or not 0 <= seq <= MAX_COUNT:
        raise Rejected("bad_record", f"seq {seq!r:.40} is not an integer in 0..2**53-1")
    if type(t) not in (float, int) or not math.isfinite(t):
        raise Rejected("bad_record", "t is not a finite number")
    if step is not None and (type(step) is not int or not INT64_MIN <= step <= INT64):
        raise Rejected("bad_record", f"step {step!r:.40} is not a 64-bit integer")
    if type(body) is not dict:
        raise Rejected("bad_record", "body is not a map")
    if kind == protocol.SCALARS:  # the hot path: checked whole, in C where possible
        _check_scalars(body)
        return Record(kind, seq, float(t), step, body)
    if type(kind) is not str or kind not in protocol.KINDS:
        raise Rejected("bad_record", f"unknown kind {kind!r:.80}")
    check = _BODY_CHECKS.get(kind)
    if check is not None:
        check(body)
    # Every body is written to the store as JSON: string keys and plain values only
    # (bytes only as tensor data, no msgpack ext types).
    for key, value in body.items():
        if type(key) is not str:
            raise Rejected("bad_record", "body keys must be strings")
        if not (kind == protocol.TENSOR and key == "data"):
            _check_plain(value, 0)
    return Record(kind, seq, float(t), step, body)


SCALARS = protocol.SCALARS
_NUMBER_TYPES = frozenset((float, int))
_INT_TYPES = frozenset((int,))
_FLOAT_TYPES = frozenset((float,))
_STEP_TYPES = frozenset((int, type(None)))
_LIST_TYPES = frozenset((list,))
# Metric names already validated; a bounded cache, so millions of names cannot grow it.
_KNOWN_NAMES: set[str] = set()
MAX_KNOWN_NAMES = 100_000
_NAME_TYPES = frozenset((str,))


def _check_name(name: Any, what: str) -> None:
    if type(name) is not str or not 0 < len(name) <= protocol.MAX_NAME_CHARS:
        raise Rejected(
            "bad_record", f"{what} must be a string of 1-{protocol.MAX_NAME_CHARS} chars"
        )


def _check_scalars(body: dict[str, Any]) -> None:
    if len(body) > protocol.MAX_METRICS_PER_RECORD:
        raise Rejected("bad_record", f"more than {protocol.MAX_METRICS_PER_RECORD} metrics")
    if not body or (
        _NUMBER_TYPES.issuperset(map(type, body.values()))
        and _NAME_TYPES.issuperset(map(type, body))
        and min(map(len, body)) > 0
        and max(map(len, body)) <= protocol.MAX_NAME_CHARS
    ):
        if len(_KNOWN_NAMES) < MAX_KNOWN_NAMES:
            _KNOWN_NAMES.update(body)  # next time these names take the fast path
        return
    for name, value in body.items():  # slow path: say exactly what is wrong
        if type(name) is not str or not 0 < len(name) <= protocol.MAX_NAME_CHARS:
            raise Rejected("bad_record", f"metric name {name!r:.80} is invalid")
        if type(value) not in (float, int):
            raise Rejected("bad_record", f"metric {name!r} is {type(value).__name__}, not a number")


def _check_tensor(body: dict[str, Any]) -> None:
    _check_name(body.get("name"), "tensor name")
    shape, dtype, data = body.get("shape"), body.get("dtype"), body.get("data")
    if type(dtype) is not str or dtype not in TENSOR_DTYPES:
        raise Rejected("bad_record", f"tensor dtype {dtype!r} is not supported")
    if type(shape) is not list or len(shape) > 8 or any(type(d) is not int or d < 0 for d in shape):
        raise Rejected("bad_record", "tensor shape must be up to 8 non-negative integers")
    if type(data) is not bytes:
        raise Rejected("bad_record", "tensor data must be bytes")
    count = math.prod(shape)
    if count * TENSOR_DTYPES[dtype] != len(data):
        raise Rejected("bad_record", f"tensor data is {len(data)} bytes, shape says otherwise")
    bins = body.get("bins")
    if bins is not None and (type(bins) is not int or not 1 <= bins <= MAX_BINS):
        raise Rejected("bad_record", f"histogram bins must be an integer in 1..{MAX_BINS}")
    if body.get("as") == "histograms":
        _check_histogram_batch(body, count)


def _check_histogram_batch(body: dict[str, Any], count: int) -> None:
    """A batch of histogram samples: a name and a length for each, the lengths adding up."""
    names, lengths = body.get("names"), body.get("lengths")
    if type(names) is not list or type(lengths) is not list or len(names) != len(lengths):
        raise Rejected("bad_record", "a histogram batch needs names and lengths of one size")
    for name in names:
        _check_name(name, "histogram name")
    if any(type(n) is not int or n < 0 for n in lengths) or sum(lengths) != count:
        raise Rejected("bad_record", "histogram batch lengths must add up to the tensor's size")


def _check_text(body: dict[str, Any]) -> None:
    _check_name(body.get("name"), "text name")
    text = body.get("text")
    if type(text) is not str or len(text) > protocol.MAX_TEXT_CHARS:
        raise Rejected("bad_record", "text must be a string within the size limit")


def _check_event(body: dict[str, Any]) -> None:
    _check_name(body.get("name"), "event name")
    _check_plain(body.get("attrs", {}), 0)


def _check_config(body: dict[str, Any]) -> None:
    params = body.get("params")
    if type(params) is not dict:
        raise Rejected("bad_record", "config params must be a map")
    _check_plain(params, 0)


def _check_counters(body: dict[str, Any]) -> None:
    """The probe's counters are counts, 0..2**53-1, the drops added up included."""
    dropped = body.get("dropped", {})
    if (
        type(dropped) is not dict
        or any(type(k) is not str or not _is_count(v) for k, v in dropped.items())
        or sum(dropped.values()) > MAX_COUNT
    ):
        raise Rejected("bad_record", "dropped must map reasons to counts")
    for key in ("produced", "invalid_values", "internal_errors"):
        if not _is_count(body.get(key, 0)):
            raise Rejected("bad_record", f"{key} must be a count (an integer in 0..2**53-1)")


def _is_count(value: Any) -> bool:
    return type(value) is int and 0 <= value <= MAX_COUNT


def _check_run_end(body: dict[str, Any]) -> None:
    status = body.get("exit_status")
    if status is not None and type(status) is not int:
        raise Rejected("bad_record", "exit_status must be an integer")


def _check_plain(value: Any, depth: int) -> None:
    """JSON-like values only, bounded in depth (configs and event attributes)."""
    if depth > MAX_NESTING:
        raise Rejected("bad_record", f"nested deeper than {MAX_NESTING}")
    kind = type(value)
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise Rejected("bad_record", "map keys must be strings")
            _check_plain(item, depth + 1)
    elif kind is list:
        for item in value:
            _check_plain(item, depth + 1)
    elif kind not in _PLAIN_SCALARS:
        raise Rejected("bad_record", f"{kind.__name__} values are not allowed here")


_PLAIN_SCALARS = (str, int, float, bool, type(None))

TENSOR_DTYPES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}


def _check_plain_body(body: dict[str, Any]) -> None:
    _check_plain(body, 0)


_BODY_CHECKS = {
    protocol.HELLO: _check_plain_body,
    protocol.HEARTBEAT: _check_plain_body,
    protocol.SCALARS: _check_scalars,
    protocol.TENSOR: _check_tensor,
    protocol.TEXT: _check_text,
    protocol.EVENT: _check_event,
    protocol.CONFIG: _check_config,
    protocol.PROBE_STATS: _check_counters,
    protocol.BYE: _check_counters,
    protocol.RUN_END: _check_run_end,
}
