"""Properties of the decoder on any input (hypothesis; tests/conftest.py sets the profile).

``decode`` either returns a message or raises ``Rejected`` with a known reason, never
anything else; every record and scalar block it accepts is one docs/protocol.md allows;
and for a well-formed envelope each record is either accepted or rejected with a reason
(records in == records the good ones stand for, ``Message.count``, + rejected).
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ingest.decode import Message, Record, Rejected, ScalarRows, decode
from probe import protocol
from tests.agent.ingest.hostile import (
    BOMBS,
    INT64,
    MAX_COUNT,
    MESSAGE_REASONS,
    RECORD_REASONS,
    anything,
    block_problems,
    edge_block,
    edge_record,
    envelope,
    good_block,
    good_record,
    hostile_message,
    pack,
    problems,
    record_problems,
    records_in,
    spoiled_block,
    spoiled_record,
    wide_block,
)

VERSIONS = st.sampled_from(sorted(protocol.READABLE_VERSIONS))


def decode_or_reason(raw: bytes) -> Message | str:
    """The decoded message, or the reason it was rejected; any other exception fails."""
    try:
        return decode(raw)
    except Rejected as rejected:
        assert rejected.reason in MESSAGE_REASONS, rejected
        return rejected.reason


def check_accepted(message: Message) -> None:
    for item in message.records:
        assert problems(item) == [], item
    assert message.count == sum(
        len(item) if isinstance(item, ScalarRows) else 1 for item in message.records
    )
    for reason, detail in message.rejected:
        assert reason in RECORD_REASONS, (reason, detail)
        assert isinstance(detail, str)


def identity(item: Any) -> tuple[Any, ...]:
    """A wire record, or an accepted record or block, as (kind, seqs)."""
    if isinstance(item, Record):
        return (item.kind, item.seq)
    if isinstance(item, ScalarRows):
        return (protocol.SCALAR_ROWS, tuple(item.seqs))
    if item[0] == protocol.SCALAR_ROWS:
        return (protocol.SCALAR_ROWS, tuple(item[2]))
    return (item[0], item[1])


def in_order(wanted: list[Any], got: list[Any]) -> bool:
    """Whether ``wanted`` is ``got`` with some items left out."""
    rest = iter(got)
    return all(item in rest for item in wanted)


@given(st.binary(max_size=512))
def test_any_bytes_are_decoded_or_rejected_with_a_known_reason(raw: bytes) -> None:
    """Random bytes never raise anything but Rejected with a message-level reason."""
    result = decode_or_reason(raw)
    if isinstance(result, Message):
        check_accepted(result)


@given(anything)
def test_any_msgpack_value_is_decoded_or_rejected(value: Any) -> None:
    """Any msgpack value (ext types, huge ints, NaN, nested maps) decodes or is rejected."""
    result = decode_or_reason(msgpack.packb(value, use_bin_type=True))
    if isinstance(result, Message):
        check_accepted(result)


@given(st.lists(good_record() | good_block(), max_size=8))
def test_good_records_and_blocks_are_all_accepted_in_order(records: list[Any]) -> None:
    """Records and scalar blocks within every documented limit are accepted, in order,
    none rejected, each block counted as its rows."""
    message = decode(pack(protocol.VERSION, envelope(), records))
    assert message.rejected == []
    assert list(map(identity, message.records)) == list(map(identity, records))
    assert message.count == sum(map(records_in, records))
    assert message.envelope == {**envelope(), "restart": 0}  # an old probe: restart 0
    check_accepted(message)


@given(st.lists(good_record() | good_block(), max_size=8))
def test_a_version_1_message_refuses_each_block_as_one_record(records: list[Any]) -> None:
    """Version 1 has no blocks: each is one bad record, the plain records are kept."""
    message = decode(pack(1, envelope(), records))
    plain = [record for record in records if record[0] != protocol.SCALAR_ROWS]
    assert list(map(identity, message.records)) == list(map(identity, plain))
    assert len(message.rejected) == len(records) - len(plain)
    check_accepted(message)


@given(
    st.lists(
        st.tuples(st.booleans(), good_record() | good_block(), spoiled_record() | spoiled_block()),
        max_size=8,
    ),
    VERSIONS,
)
def test_every_record_of_a_good_envelope_is_accepted_or_rejected(
    picks: list[tuple[bool, list[Any], Any]], version: int
) -> None:
    """records in == accepted (a block counts its rows) + rejected; each good record and
    block is accepted; rejects have a reason."""
    records = [good if keep else spoiled for keep, good, spoiled in picks]
    message = decode_or_reason(pack(version, envelope(), records))
    assert isinstance(message, Message), message
    assert message.count + len(message.rejected) == sum(records_in(r, version) for r in records)
    wanted = [
        identity(good)
        for keep, good, _ in picks
        if keep and (version >= 2 or good[0] != protocol.SCALAR_ROWS)
    ]
    assert in_order(wanted, list(map(identity, message.records)))
    check_accepted(message)


@given(edge_record() | edge_block())
def test_a_number_at_its_bound_is_accepted_and_past_it_refused(record: list[Any]) -> None:
    """Seqs and probe counts of 0..2**53-1, steps of 64 bits and bins of 1..512 are accepted,
    anything past them refused: exactly what docs/protocol.md allows."""
    message = decode(pack(protocol.VERSION, envelope(), [record]))
    if record[0] == protocol.SCALAR_ROWS:
        allowed = block_problems(ScalarRows(*record[1:], top_seq=0, top_step=None)) == []
    else:
        allowed = record_problems(Record(*record)) == []
    assert message.count == (records_in(record) if allowed else 0)
    assert len(message.rejected) == (0 if allowed else records_in(record))


@given(hostile_message())
def test_hostile_messages_are_decoded_or_rejected(raw: bytes) -> None:
    """Truncated, bit-flipped, bombed, wrong-version and wrong-envelope messages, blocks in
    version 1 and blocks past the record limit."""
    result = decode_or_reason(raw)
    if isinstance(result, Message):
        check_accepted(result)


@given(st.lists(good_record() | good_block(), min_size=1, max_size=4), st.data())
def test_a_truncated_message_is_malformed(records: list[Any], data: st.DataObject) -> None:
    """Any strict prefix of a message is rejected whole as malformed."""
    whole = pack(protocol.VERSION, envelope(), records)
    cut = data.draw(st.integers(0, len(whole) - 1))
    assert decode_or_reason(whole[:cut]) == "malformed"


@pytest.mark.parametrize("bomb", BOMBS, ids=range(len(BOMBS)))
def test_msgpack_bombs_are_refused_without_building_them(bomb: bytes) -> None:
    """Headers claiming 2**32 - 1 elements or 4 GiB, short maps, 100,000 levels of nesting."""
    result = decode_or_reason(bomb)
    if isinstance(result, Message):  # the bomb sat inside one record: that record goes
        assert result.records == []
        assert [reason for reason, _ in result.rejected] == ["bad_record"]
    else:
        assert result == "malformed"


def test_oversized_message_is_rejected_before_unpacking() -> None:
    """One byte over the message limit is rejected as oversized, whatever it holds."""
    assert decode_or_reason(bytes(protocol.MAX_MESSAGE_BYTES + 1)) == "oversized"


@pytest.mark.parametrize(
    "record",
    [
        [protocol.SCALARS, -1, 0.0, 0, {"a": 1.0}],
        [protocol.SCALARS, 0, math.nan, 0, {"a": 1.0}],
        [protocol.SCALARS, 0, math.inf, 0, {"a": 1.0}],
        [protocol.SCALARS, 0, 0.0, 1.5, {"a": 1.0}],
        [protocol.SCALARS, 0, 0.0, math.nan, {"a": 1.0}],
        [protocol.SCALARS, 0.0, 0.0, 0, {"a": 1.0}],
        [protocol.SCALARS, True, 0.0, 0, {"a": 1.0}],
        [protocol.SCALARS, 0, 0.0, 0, {"x" * 10_000: 1.0}],
        [protocol.SCALARS, 0, 0.0, 0, {"a": True}],
        [protocol.SCALARS, 0, 0.0, 0, {"a": None}],
    ],
    ids=[
        "negative_seq",
        "nan_t",
        "inf_t",
        "float_step",
        "nan_step",
        "float_seq",
        "bool_seq",
        "10kB_name",
        "bool_value",
        "nil_value",
    ],
)
def test_wrong_numbers_and_names_are_bad_records(record: list[Any]) -> None:
    """NaN times and steps, negative or non-integer seqs, 10 kB names, non-number values."""
    message = decode(pack(protocol.VERSION, envelope(), [record]))
    assert message.records == []
    assert [reason for reason, _ in message.rejected] == ["bad_record"]


@given(st.text(min_size=1, max_size=protocol.MAX_NAME_CHARS))
def test_unicode_metric_names_within_the_limit_are_accepted(name: str) -> None:
    """Any unicode name of 1-256 characters (what msgpack carries as UTF-8) is a metric name."""
    try:
        raw = pack(protocol.VERSION, envelope(), [[protocol.SCALARS, 0, 0.0, 0, {name: 1.0}]])
    except UnicodeEncodeError:  # a lone surrogate: the probe cannot send it either
        return
    (record,) = decode(raw).records
    assert isinstance(record, Record) and record.body == {name: 1.0}


# -- numbers every consumer can hold: run.json's integers, TensorBoard's int64 steps ------
#: the agent once died on these: a seq of 2**64 - 1 (run.json: "Integer exceeds 64-bit
#: range"), a bye whose drop counts added up past 2**64


@pytest.mark.parametrize("seq", [MAX_COUNT + 1, INT64, 2**64 - 1])
def test_seq_past_2_53_is_a_bad_record(seq: int) -> None:
    """A sequence number past 2**53 - 1 is refused alone (the probe never makes one)."""
    records = [[protocol.SCALARS, seq, 0.0, 0, {"a": 1.0}], [protocol.SCALARS, 1, 0.0, 0, {}]]
    message = decode(pack(protocol.VERSION, envelope(), records))
    assert list(map(identity, message.records)) == [(protocol.SCALARS, 1)]
    assert [reason for reason, _ in message.rejected] == ["bad_record"]


@pytest.mark.parametrize("step", [INT64, 2**64 - 1])
def test_step_beyond_int64_is_a_bad_record(step: int) -> None:
    """A step past 2**63 - 1 is refused (TensorBoard's steps are int64)."""
    message = decode(
        pack(protocol.VERSION, envelope(), [[protocol.SCALARS, 0, 0.0, step, {"a": 1.0}]])
    )
    assert [reason for reason, _ in message.rejected] == ["bad_record"]


@pytest.mark.parametrize(
    "body",
    [
        {"produced": 2**64 - 1},
        {"produced": MAX_COUNT + 1},
        {"internal_errors": INT64},
        {"dropped": {"queue_full": 2**64 - 1, "no_agent": 2**64 - 1}},
        {"dropped": {"queue_full": 2**52, "no_agent": 2**52}},
        {"dropped": {"queue_full": -1}},
        {"invalid_values": -5},
        {"produced": -1},
        {"produced": 1.0},
    ],
    ids=[
        "produced_2**64-1",
        "produced_2**53",
        "internal_errors_2**63",
        "dropped_sum_past_2**64",
        "dropped_sum_2**53",
        "negative_dropped",
        "negative_invalid_values",
        "negative_produced",
        "float_produced",
    ],
)
@pytest.mark.parametrize("kind", [protocol.BYE, protocol.PROBE_STATS])
def test_probe_counters_out_of_range_are_a_bad_record(kind: str, body: dict[str, Any]) -> None:
    """bye / probe_stats counters are counts: integers in 0..2**53-1, their drops added up
    included."""
    message = decode(pack(protocol.VERSION, envelope(), [[kind, 0, 0.0, None, body]]))
    assert [reason for reason, _ in message.rejected] == ["bad_record"]


@pytest.mark.parametrize(
    "record",
    [
        [protocol.SCALARS, MAX_COUNT, 0.0, INT64 - 1, {"a": 1.0}],
        [protocol.SCALARS, 0, 0.0, -INT64, {"a": 1.0}],
        [protocol.BYE, MAX_COUNT, 0.0, None, {"produced": MAX_COUNT, "internal_errors": 0}],
        [
            protocol.PROBE_STATS,
            0,
            0.0,
            None,
            {"dropped": {"queue_full": MAX_COUNT - 1, "no_agent": 1}},
        ],
        wide_block(2, first_seq=MAX_COUNT - 1),
    ],
    ids=["seq_2**53-1_step_2**63-1", "step_-2**63", "bye_2**53-1", "drops_sum_2**53-1", "block"],
)
def test_the_largest_counts_and_steps_are_accepted(record: list[Any]) -> None:
    """The bounds themselves are good: seq and counts 2**53 - 1, steps -2**63 and 2**63 - 1."""
    message = decode(pack(protocol.VERSION, envelope(), [record]))
    assert message.rejected == []
    assert message.count == records_in(record)
    check_accepted(message)


@pytest.mark.parametrize(
    ("column", "value"),
    [(2, MAX_COUNT + 1), (2, 2**64 - 1), (2, -1), (4, INT64), (4, 2**64 - 1)],
    ids=["seq_2**53", "seq_2**64-1", "seq_-1", "step_2**63", "step_2**64-1"],
)
def test_a_block_with_a_number_out_of_range_is_refused_each_record_counted(
    column: int, value: int
) -> None:
    """One seq or step out of range in a block refuses its three records, not its neighbour."""
    bad = wide_block(3)
    bad[column][1] = value
    message = decode(pack(protocol.VERSION, envelope(), [bad, wide_block(2, first_seq=3)]))
    assert [reason for reason, _ in message.rejected] == ["bad_record"] * 3
    assert message.count == 2


@pytest.mark.parametrize("bins", ["x", math.nan, -3, 0, 513, [8], 2**40, True])
def test_histogram_bins_must_be_a_small_positive_integer(bins: Any) -> None:
    """A histogram's ``bins`` is 1..512 (it once made the store raise: the message was lost)."""
    body = {"name": "h", "dtype": "float64", "shape": [1], "data": struct.pack("<d", 1.0)}
    record = [protocol.TENSOR, 0, 0.0, 0, {**body, "as": "histogram", "bins": bins}]
    message = decode(pack(protocol.VERSION, envelope(), [record]))
    assert [reason for reason, _ in message.rejected] == ["bad_record"]


@pytest.mark.parametrize(
    "kind", [[], {}, ["scalars"], 7, None], ids=["list", "map", "list_of_kind", "int", "nil"]
)
def test_a_kind_that_is_not_a_string_is_a_bad_record(kind: Any) -> None:
    """A record whose kind is an array or a map is refused alone (decode() once raised
    TypeError, which the agent counted as an internal error: the good records beside it
    were lost)."""
    records = [[kind, 0, 0.0, 0, {"a": 1.0}], [protocol.SCALARS, 1, 0.0, 0, {"a": 1.0}]]
    message = decode(pack(protocol.VERSION, envelope(), records))
    assert list(map(identity, message.records)) == [(protocol.SCALARS, 1)]
    assert [reason for reason, _ in message.rejected] == ["bad_record"]


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        (protocol.SCALARS, {1: 1.0}),
        (protocol.CONFIG, {"params": {2: "x"}}),
        (protocol.EVENT, {"name": "e", "attrs": {-1: None}}),
        (protocol.HELLO, {b"cwd": "/"}),
        (protocol.BYE, {"dropped": {1.5: 1}}),
    ],
    ids=["metric_name", "config_key", "event_attr_key", "bytes_key", "drop_reason_key"],
)
def test_a_non_string_map_key_costs_only_its_record(kind: str, body: dict[Any, Any]) -> None:
    """A body with a key that is not a string is a bad record; the good record beside it is
    kept (docs/protocol.md: a bad body rejects that record only)."""
    records = [[kind, 0, 0.0, 0, body], [protocol.SCALARS, 1, 0.0, 0, {"a": 1.0}]]
    message = decode(pack(protocol.VERSION, envelope(), records))
    assert list(map(identity, message.records)) == [(protocol.SCALARS, 1)]
    assert [reason for reason, _ in message.rejected] == ["bad_record"]
