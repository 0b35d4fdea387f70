"""Scalar blocks (protocol version 2): the probe's grouping, the agent's checks, and the
promise that a block is stored exactly as the records it stands for."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.ingest.decode import Record, ScalarRows, decode
from agent.store.layout import METRICS
from agent.store.run_store import RunStore
from probe import protocol
from probe.blocks import to_blocks
from tests.helpers import envelope, pack, scalars

T0 = time.time()


def record(seq: int, metrics: dict[str, Any], step: int | None = None) -> list[Any]:
    return [protocol.SCALARS, seq, T0 + seq, seq if step is None else step, metrics]


def test_consecutive_records_with_the_same_names_become_one_block() -> None:
    wire = [
        record(0, {"loss": 1.0, "lr": 0.1}),
        record(1, {"loss": 0.9, "lr": 0.1}),
        [protocol.EVENT, 2, T0, 1, {"name": "epoch_end", "attrs": {}}],
        record(3, {"loss": 0.8, "lr": 0.1}),
        record(4, {"lr": 0.1, "loss": 0.7}),  # same names, other order: a new block
        record(5, {"lr": 0.1, "loss": 0.6}),
        record(6, {"val/loss": 2.0}),
    ]
    blocks = to_blocks(wire)
    assert blocks == [
        [
            protocol.SCALAR_ROWS,
            ["loss", "lr"],
            [0, 1],
            [T0, T0 + 1],
            [0, 1],
            [[1.0, 0.1], [0.9, 0.1]],
        ],
        wire[2],
        wire[3],  # alone between two other records: stays a plain record
        [
            protocol.SCALAR_ROWS,
            ["lr", "loss"],
            [4, 5],
            [T0 + 4, T0 + 5],
            [4, 5],
            [[0.1, 0.7], [0.1, 0.6]],
        ],
        wire[6],
    ]


def store_lines(tmp_path: Path, name: str, raw: bytes) -> list[dict[str, Any]]:
    message = decode(raw)
    assert message.rejected == []
    store = RunStore(tmp_path / name, "run")
    store.add(message.envelope, message.records, message.count)
    store.close()
    return [orjson.loads(line) for line in (store.dir / METRICS).read_bytes().splitlines()]


def test_a_block_is_stored_line_for_line_as_version_1_records(tmp_path: Path) -> None:
    """The same records sent by an old probe (version 1) and a new one (version 2 blocks)
    give the same metrics.jsonl and the same accounting, NaN, infinity and nil steps
    included."""
    wire = [record(i, {"loss": 1.0 / (i + 1), "step_time": 0.1, "count": i}) for i in range(6)]
    wire[2][4]["loss"] = math.nan
    wire[3][4]["step_time"] = -math.inf
    wire[4][3] = None
    env = envelope("run", "s1")
    v1 = store_lines(tmp_path, "v1", pack(env, wire, version=1))
    v2_message = pack(env, to_blocks(wire), version=2)
    assert isinstance(decode(v2_message).records[0], ScalarRows)
    v2 = store_lines(tmp_path, "v2", v2_message)
    assert v2 == v1
    assert len(v2) == 6
    assert v2[2]["metrics"]["loss"] == "NaN" and v2[3]["metrics"]["step_time"] == "-Infinity"
    assert v2[4]["step"] is None
    info = [orjson.loads((tmp_path / n / "run" / "run.json").read_bytes()) for n in ("v1", "v2")]
    assert info[0]["streams"] == info[1]["streams"]
    assert info[1]["streams"][0]["received"] == 6 and info[1]["last_step"] == 5


def block(count: int = 3, **fields: Any) -> list[Any]:
    good = {
        "kind": protocol.SCALAR_ROWS,
        "names": ["loss", "lr"],
        "seqs": list(range(10, 10 + count)),
        "ts": [T0 + i for i in range(count)],
        "steps": list(range(count)),
        "rows": [[1.0, 0.1]] * count,
    }
    good.update(fields)
    return list(good.values())


BAD_BLOCKS = {
    "kind": block(kind="scalars_rows"),
    "duplicate names": block(names=["loss", "loss"]),
    "empty name": block(names=["loss", ""]),
    "long name": block(names=["loss", "x" * (protocol.MAX_NAME_CHARS + 1)]),
    "name not a string": block(names=["loss", 7]),
    "no names": block(names=[]),
    "negative seq": block(seqs=[10, -1, 12]),
    "float seq": block(seqs=[10, 11.0, 12]),
    "short ts": block(ts=[T0, T0]),
    "nan t": block(ts=[T0, math.nan, T0]),
    "int t": block(ts=[T0, 5, T0]),
    "string step": block(steps=[0, "1", 2]),
    "narrow row": block(rows=[[1.0, 0.1], [1.0], [1.0, 0.1]]),
    "row not an array": block(rows=[[1.0, 0.1], {"loss": 1.0}, [1.0, 0.1]]),
    "string value": block(rows=[[1.0, 0.1], [1.0, "0.1"], [1.0, 0.1]]),
    "bool value": block(rows=[[1.0, 0.1], [True, 0.1], [1.0, 0.1]]),
    "nested value": block(rows=[[1.0, 0.1], [[1.0], 0.1], [1.0, 0.1]]),
}


@pytest.mark.parametrize("bad", BAD_BLOCKS.values(), ids=BAD_BLOCKS.keys())
def test_a_bad_block_is_refused_whole_each_record_counted_and_its_neighbours_kept(
    bad: list[Any],
) -> None:
    raw = pack(envelope(), [scalars(0, 0, {"a": 1.0}), bad, block(count=2)], version=2)
    message = decode(raw)
    assert len(message.rejected) == 3  # the bad block's three records
    assert {reason for reason, _ in message.rejected} == {"bad_record"}
    assert message.count == 3  # the plain record and the good block of two
    assert isinstance(message.records[0], Record)
    assert isinstance(message.records[1], ScalarRows)


def test_blocks_are_a_version_2_feature() -> None:
    message = decode(pack(envelope(), [block()], version=1))
    assert message.records == [] and message.count == 0
    assert [reason for reason, _ in message.rejected] == ["bad_record"]


def test_a_message_holds_at_most_the_record_limit_blocks_included() -> None:
    limit = protocol.MAX_RECORDS_PER_MESSAGE
    rows = limit // 2
    first = block(count=rows)
    overflow = block(count=rows + 1)
    message = decode(pack(envelope(), [first, overflow], version=2))
    assert message.count == rows
    assert len(message.rejected) == rows + 1
    assert "block holds 1 to" in message.rejected[0][1]


def test_the_probe_sends_version_2_and_the_agent_still_reads_version_1() -> None:
    assert protocol.VERSION == 2
    assert {1, 2} == protocol.READABLE_VERSIONS
    for version in (1, 2):
        assert decode(pack(envelope(), [scalars(0, 0, {"a": 1.0})], version=version)).count == 1
