"""The run store on a real small filesystem: full, read-only, removed, and space back.

What it cannot write is cut back to whole lines and counted per stream by
reason; run.json keeps exact accounting; writing resumes by itself.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import orjson

from agent.ingest.decode import Record
from agent.store.disk import STORE_ERROR, STORE_FULL
from agent.store.layout import ALERTS, METRICS, RUN_JSON, TENSORS
from agent.store.run_store import RunStore
from probe import protocol
from tests.helpers import envelope
from tests.small_disk import SmallDisk

RUN = "disk-run"


class Stream:
    """A trainer stream: contiguous sequence numbers, what it sent."""

    def __init__(self, name: str = "s0") -> None:
        self.env = envelope(RUN, name)
        self.seq = 0

    def scalars(self, count: int) -> list[Record]:
        records = []
        for _ in range(count):
            metrics = {"loss": 1.0 / (self.seq + 1), "lr": 0.01, "acc": 0.5}
            records.append(Record(protocol.SCALARS, self.seq, time.time(), self.seq, metrics))
            self.seq += 1
        return records

    def tensor(self, nbytes: int) -> Record:
        data = bytes([self.seq % 251]) * nbytes
        body = {"name": "features", "dtype": "uint8", "shape": [nbytes], "data": data}
        record = Record(protocol.TENSOR, self.seq, time.time(), self.seq, body)
        self.seq += 1
        return record


def put(store: RunStore, stream: Stream, records: list[Record]) -> None:
    """One message of the stream's records, added to the store."""
    store.add(stream.env, records, len(records))


def whole_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file, which must end with a newline and parse throughout."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends in the middle of a line"
    return [orjson.loads(line) for line in data.splitlines()]


def log_until_refused(store: RunStore, stream: Stream, per_flush: int = 200) -> int:
    """Add and flush scalars until the disk refuses some; returns the records refused."""
    for _ in range(1000):
        put(store, stream, stream.scalars(per_flush))
        refused = store.flush()
        if refused:
            return refused
    raise AssertionError("the disk never filled")


def test_a_short_write_is_cut_back_to_whole_lines_and_counted(small_disk: SmallDisk) -> None:
    """A disk with a few pages left takes part of a flush: the file keeps whole lines only,
    and received == lines stored + not stored (store_full)."""
    store = RunStore(small_disk.dir, RUN)
    stream = Stream()
    small_disk.fill(leave=10_000)
    refused = log_until_refused(store, stream)
    ledger = store.streams["s0"]
    stored = whole_lines(store.dir / METRICS)
    assert refused > 0 and ledger.not_stored == {STORE_FULL: refused}
    assert ledger.received == stream.seq == len(stored) + refused
    assert [line["seq"] for line in stored] == list(range(len(stored)))
    assert store.failure is not None and len(store.alarms) == 1
    assert store.alarms[0]["name"] == "store_failed" and store.alarms[0]["severity"] == "critical"
    store.close()


def test_writing_resumes_when_space_comes_back(small_disk: SmallDisk) -> None:
    """Refused while full, stored again once the filler is gone; one alarm per episode,
    and the store says it writes again after a beat without a failure."""
    store = RunStore(small_disk.dir, RUN)
    stream = Stream()
    small_disk.fill(leave=4096)
    log_until_refused(store, stream)
    for _ in range(3):  # still full: counted each time, no new alarm
        put(store, stream, stream.scalars(100))
        assert store.flush() == 100
    assert len(store.alarms) == 1
    refused = sum(store.streams["s0"].not_stored.values())
    small_disk.make_room()
    first_after = stream.seq
    put(store, stream, stream.scalars(100))
    assert store.flush() == 0
    store.write_info()  # the beat that saw a failure
    assert store.failure is not None
    store.write_info()  # a whole beat without one
    assert store.failure is None
    stored = whole_lines(store.dir / METRICS)
    assert [line["seq"] for line in stored][-100:] == list(range(first_after, stream.seq))
    assert len(stored) + refused == stream.seq == store.streams["s0"].received
    store.close()
    info = orjson.loads((store.dir / RUN_JSON).read_bytes())
    assert info["not_stored"] == {STORE_FULL: refused}
    assert info["store"]["failing"] is None and info["store"]["failures"] == 1


def test_tensor_offsets_stay_true_when_tensor_bytes_are_refused(small_disk: SmallDisk) -> None:
    """tensors.bin holds exactly the bytes of the tensor lines kept: each stored line's
    offset reads back its own data, before and after the disk refused some."""
    store = RunStore(small_disk.dir, RUN)
    stream = Stream()
    small_disk.fill(leave=100_000)
    for index in range(40):
        # big tensors (tensors.bin refuses them) and many lines (metrics.jsonl refuses them)
        big = index % 2 == 0
        message = [stream.tensor(30_000)] if big else [*stream.scalars(300), stream.tensor(1000)]
        put(store, stream, message)
        store.flush()
    assert store.streams["s0"].not_stored.get(STORE_FULL, 0) > 0
    small_disk.make_room()
    for _ in range(3):
        put(store, stream, [stream.tensor(30_000)])
        assert store.flush() == 0
    store.close()
    blob = (store.dir / TENSORS).read_bytes()
    tensors = [line for line in whole_lines(store.dir / METRICS) if line["kind"] == "tensor"]
    assert tensors and tensors[-1]["seq"] == stream.seq - 1
    assert len(blob) == sum(line["nbytes"] for line in tensors)
    for line in tensors:
        data = blob[line["offset"] : line["offset"] + line["nbytes"]]
        assert data == bytes([line["seq"] % 251]) * line["nbytes"], line["seq"]


def test_run_json_keeps_exact_accounting_when_the_disk_is_full(small_disk: SmallDisk) -> None:
    """With no byte free, the final run.json still goes through the reserved spare: it says
    every received record was not stored, and the spare is given back."""
    small_disk.require_tmpfs("filling the disk to the last byte")
    store = RunStore(small_disk.dir, RUN)
    stream = Stream()
    small_disk.fill()
    put(store, stream, stream.scalars(500))
    assert store.flush() == 500
    bye = {"produced": 501, "dropped": {}}
    put(store, stream, [Record(protocol.BYE, 500, time.time(), None, bye)])
    store.flush()
    store.close()
    info = orjson.loads((store.dir / RUN_JSON).read_bytes())
    (summary,) = info["streams"]
    assert info["status"] == "finished"
    assert summary["received"] == 501 and summary["not_stored"] == {STORE_FULL: 501}
    assert summary["received"] + sum(summary["dropped"].values()) + summary["lost"] == 501
    assert info["not_stored"] == {STORE_FULL: 501} and info["records"] == 501
    assert sorted(os.listdir(store.dir)) == [METRICS, RUN_JSON, TENSORS]


def test_alerts_jsonl_holds_whole_lines_only(small_disk: SmallDisk) -> None:
    """Alerts refused by a full disk leave no half line in alerts.jsonl or metrics.jsonl,
    and count as the agent's own lines not stored."""
    store = RunStore(small_disk.dir, RUN)
    small_disk.fill(leave=20_000)
    for index in range(200):
        alert = {"kind": "alert", "name": "loss_spike", "message": "x" * 500, "index": index}
        store.add_alert(alert)
        store.flush()
    refused = store.agent_lines_not_stored[STORE_FULL]
    assert refused > 0
    kept = whole_lines(store.dir / ALERTS)
    assert [a["index"] for a in kept] == [a["index"] for a in whole_lines(store.dir / METRICS)]
    assert len(kept) + refused == 200
    store.close()


def test_a_directory_that_cannot_be_made_counts_store_error_until_it_can(
    tmp_path: Path,
) -> None:
    """The run directory removed and a file put in its place: records count under
    store_error, run.json cannot be written; the file gone, the store writes on by itself.
    (A filesystem cannot be remounted read-only while the store holds files open for
    writing, so this is how a failing directory looks to a running agent.)"""
    store = RunStore(tmp_path, RUN)
    stream = Stream()
    put(store, stream, stream.scalars(10))
    store.flush()
    shutil.rmtree(store.dir)
    store.dir.write_bytes(b"not a directory")
    assert store.write_info() is False
    put(store, stream, stream.scalars(10))
    assert store.flush() == 10
    assert store.write_info() is False
    assert store.streams["s0"].not_stored == {STORE_ERROR: 10}
    assert len(store.alarms) == 1 and store.alarms[0]["attrs"]["reason"] == STORE_ERROR
    store.dir.unlink()
    assert store.write_info() is True
    put(store, stream, stream.scalars(10))
    assert store.flush() == 0
    store.close()
    assert [line["seq"] for line in whole_lines(store.dir / METRICS)] == list(range(20, 30))
    info = orjson.loads((store.dir / RUN_JSON).read_bytes())
    assert info["not_stored"] == {STORE_ERROR: 10} and info["records"] == 30


def test_a_run_store_opened_on_a_read_only_disk_counts_until_it_can_write(
    small_disk: SmallDisk,
) -> None:
    """A run directory that cannot be made (read-only here; no permission alike) does not
    raise: records are counted, and the beat opens the files once it can."""
    small_disk.read_only()
    store = RunStore(small_disk.dir, RUN)
    stream = Stream()
    assert store.failure is not None and "read-only" in store.failure
    put(store, stream, stream.scalars(5))
    assert store.flush() == 5
    assert store.write_info() is False
    small_disk.writable()
    assert store.write_info() is True
    put(store, stream, stream.scalars(5))
    assert store.flush() == 0
    store.close()
    lines = whole_lines(store.dir / METRICS)
    assert [line["seq"] for line in lines] == list(range(5, 10))
    assert lines[0]["source"]["stream"] == "s0"  # the first stored line says who it is
    assert orjson.loads((store.dir / RUN_JSON).read_bytes())["not_stored"] == {STORE_ERROR: 5}


def test_a_removed_run_directory_is_made_again(tmp_path: Path) -> None:
    """The run directory deleted under the agent: the next beat raises store_failed and makes
    it again; later lines land there, the first with its stream's source."""
    store = RunStore(tmp_path, RUN)
    stream = Stream()
    put(store, stream, stream.scalars(5))
    store.flush()
    shutil.rmtree(store.dir)
    store.write_info()
    assert [alarm["name"] for alarm in store.alarms] == ["store_failed"]
    put(store, stream, stream.scalars(5))
    assert store.flush() == 0
    store.close()
    lines = whole_lines(store.dir / METRICS)
    assert [line["seq"] for line in lines] == list(range(5, 10))
    assert "source" in lines[0]
    assert orjson.loads((store.dir / RUN_JSON).read_bytes())["records"] == 10


def test_a_resumed_store_keeps_what_its_predecessor_could_not_store(
    small_disk: SmallDisk,
) -> None:
    """A restarted agent rebuilds the ledgers from metrics.jsonl and adds back the records
    run.json says were not stored: the identity still holds."""
    store = RunStore(small_disk.dir, RUN)
    stream = Stream()
    small_disk.fill(leave=8192)
    refused = log_until_refused(store, stream)
    store.close()
    small_disk.make_room()
    resumed = RunStore(small_disk.dir, RUN)
    ledger = resumed.streams["s0"]
    assert ledger.received == stream.seq and ledger.not_stored == {STORE_FULL: refused}
    assert ledger.lost == 0
    resumed.close()
