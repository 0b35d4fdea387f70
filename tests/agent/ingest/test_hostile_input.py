"""The agent survives any input, tested against a real agent process.

Every test throws bytes at ``outrider agent`` from a raw ZeroMQ PUSH socket,
with good messages before and after each bad one, then checks that the agent
is still alive, that every good record is in metrics.jsonl (exact count),
that it exits 0 on SIGTERM, and that run.json's ``agent`` counters name each
rejection by reason.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest

from probe import protocol
from tests.helpers import (
    AgentProcess,
    GoodStream,
    Pusher,
    envelope,
    lines,
    pack,
    run_info,
    scalars,
)

GOOD_RUN = "good-run"


@pytest.fixture
def agent(tmp_path: Path) -> Any:
    process = AgentProcess(tmp_path)
    yield process
    process.kill()


def _t() -> float:
    return time.time()


def nested(depth: int, leaf: Any = 1, *, as_dict: bool = True) -> Any:
    value = leaf
    for _ in range(depth):
        value = {"k": value} if as_dict else [value]
    return value


# -- hostile cases ----------------------------------------------------------------
@dataclass
class Case:
    """Bad messages to interleave with good ones, and what the agent must count."""

    messages: list[bytes]
    rejected_messages: dict[str, int] = field(default_factory=dict)
    rejected_records: dict[str, int] = field(default_factory=dict)
    extra_good: int = 0  # good records hidden among the bad ones (stream "mixed")


def case_garbage() -> Case:
    return Case(
        [b"", b"\xc1", b"this is not msgpack at all \xff\xfe", bytes(range(256)), b"\x93\x01"],
        rejected_messages={"malformed": 5},
    )


def case_truncated() -> Case:
    whole = pack(envelope(stream="cut"), [scalars(i, i, {"a": 1.0, "b": 2.0}) for i in range(50)])
    return Case(
        [whole[: len(whole) // 2], whole[:-1], whole[:3]],
        rejected_messages={"malformed": 3},
    )


def case_wrong_shape() -> Case:
    env = envelope(stream="shape")
    too_many = [scalars(i, i, {"a": 1.0}) for i in range(protocol.MAX_RECORDS_PER_MESSAGE + 1)]
    return Case(
        [
            msgpack.packb({"version": 1}),
            msgpack.packb([1, env]),
            msgpack.packb([1, env, [], "extra"]),
            msgpack.packb(12345),
            pack(env, "records"),
            pack(env, too_many),
        ],
        rejected_messages={"malformed": 6},
    )


def case_oversized() -> Case:
    size = protocol.MAX_MESSAGE_BYTES + 1024  # over our limit, under ZeroMQ's 2x cut-off
    big = {"name": "big", "dtype": "uint8", "shape": [size], "data": bytes(size)}
    return Case(
        [pack(envelope(stream="big"), [[protocol.TENSOR, 0, _t(), 0, big]])],
        rejected_messages={"oversized": 1},
    )


def case_wrong_version() -> Case:
    records = [scalars(0, 0, {"a": 1.0})]
    env = envelope(stream="version")
    return Case(
        [pack(env, records, version=v) for v in (3, 0, "2", None, 2.0 + 1e-9)],
        rejected_messages={"bad_version": 5},
    )


def case_bad_envelope() -> Case:
    records = [scalars(0, 0, {"a": 1.0})]
    missing = envelope()
    del missing["pid"]
    return Case(
        [
            pack(envelope(run="../etc"), records),
            pack(envelope(run="a/b"), records),
            pack(envelope(run=""), records),
            pack(envelope(run=".hidden"), records),
            pack(envelope(run="x" * 200), records),
            pack(envelope(stream="../../s"), records),
            pack(envelope(rank="0"), records),
            pack(envelope(host="h" * 10_000), records),
            pack(missing, records),
            pack(["not", "a", "map"], records),
            pack(None, records),
            pack(envelope(restart=-1), records),
            pack(envelope(restart="1"), records),
        ],
        rejected_messages={"bad_envelope": 13},
    )


def case_mixed_records() -> Case:
    t = _t()
    good_tensor = {"name": "w", "dtype": "float32", "shape": [2], "data": bytes(8)}
    records = [
        scalars(0, 0, {"ok": 1.0}),  # good
        ["bogus_kind", 1, t, 0, {}],
        scalars(2, 0, {"loss": "1.5"}),  # string value
        scalars(-3, 0, {"loss": 1.0}),  # negative seq
        [protocol.TENSOR, 4, t, 0, {**good_tensor, "shape": [2, 2], "data": bytes(15)}],
        [protocol.TENSOR, 5, t, 0, good_tensor],  # good
        "not a record",
        [protocol.SCALARS, 7, t],
        [protocol.SCALARS, 8, math.nan, 0, {"a": 1.0}],  # t not finite
        [protocol.SCALARS, 9, t, "step", {"a": 1.0}],
        [protocol.SCALARS, 10, t, 0, ["not", "a", "map"]],
        scalars(11, 0, {"flag": True}),  # bool is not a number on the wire
        scalars(12, 0, {"": 1.0}),  # empty metric name
        [protocol.TENSOR, 13, t, 0, {**good_tensor, "dtype": "complex128", "data": bytes(32)}],
        [protocol.TEXT, 14, t, 0, {"name": "long", "text": "x" * (protocol.MAX_TEXT_CHARS + 1)}],
        [protocol.TEXT, 15, t, 3, {"name": "sample", "text": "hello"}],  # good
        [protocol.EVENT, 16, t, 3, {"name": "ckpt", "attrs": {"path": "/tmp/x", "n": 3}}],  # good
        [protocol.SCALARS, 17, t, 0, {"a": 1.0}, "sixth field"],
    ]
    return Case(
        [pack(envelope(stream="mixed"), records)],
        rejected_records={"bad_record": 14},
        extra_good=4,
    )


def case_histogram_batches() -> Case:
    """Batches of histogram samples (probe.watch's) whose names and lengths disagree."""
    t = _t()
    good = {
        "name": "histograms",
        "as": "histograms",
        "dtype": "float32",
        "shape": [3],
        "data": bytes(12),
        "names": ["weights/w"],
        "lengths": [3],
    }
    records = [
        [protocol.TENSOR, 0, t, 0, good],  # good: one histogram, one line
        [protocol.TENSOR, 1, t, 0, {**good, "names": ["a", "b"]}],  # 2 names, 1 length
        [protocol.TENSOR, 2, t, 0, {**good, "lengths": [2]}],  # adds up to 2, not 3
        [protocol.TENSOR, 3, t, 0, {**good, "lengths": [4, -1], "names": ["a", "b"]}],
        [protocol.TENSOR, 4, t, 0, {**good, "names": [""]}],  # empty name
        [protocol.TENSOR, 5, t, 0, {**good, "names": "weights/w"}],  # not a list
        [protocol.TENSOR, 6, t, 0, {**good, "lengths": [3.0]}],  # not an integer
        [protocol.TENSOR, 7, t, 0, {**good, "names": None, "lengths": None}],
    ]
    return Case(
        [pack(envelope(stream="mixed"), records)],
        rejected_records={"bad_record": 7},
        extra_good=1,
    )


def case_deep_nesting() -> Case:
    env = envelope(stream="mixed")
    t = _t()
    deep_list = nested(20, as_dict=False)
    deep_raw = b"\x93\x01" + msgpack.packb(env) + b"\x91" * 100_000 + b"\xc0"
    return Case(
        [
            pack(env, [[protocol.CONFIG, 0, t, None, {"params": {"lr": 0.1, "deep": nested(20)}}]]),
            pack(env, [[protocol.EVENT, 1, t, 0, {"name": "e", "attrs": {"a": deep_list}}]]),
            pack(env, [[protocol.HELLO, 2, t, None, {"x": nested(30)}]]),
            deep_raw,  # msgpack's own stack limit: the whole message goes
            pack(env, [[protocol.CONFIG, 3, t, None, {"params": {"shallow": nested(3)}}]]),  # good
        ],
        rejected_messages={"malformed": 1},
        rejected_records={"bad_record": 3},
        extra_good=1,
    )


def case_metric_limits() -> Case:
    env = envelope(stream="mixed")
    limit = protocol.MAX_METRICS_PER_RECORD
    return Case(
        [
            pack(env, [scalars(0, 0, {f"m{i}": float(i) for i in range(limit + 1)})]),
            pack(env, [scalars(1, 0, {f"m{i}": float(i) for i in range(limit)})]),  # good: at limit
            pack(env, [scalars(2, 0, {"n" * (protocol.MAX_NAME_CHARS + 1): 1.0})]),
            pack(env, [scalars(3, 0, {f"m{i}": 1.0 for i in range(5000)})]),  # over the map cap
        ],
        rejected_messages={"malformed": 1},
        rejected_records={"bad_record": 2},
        extra_good=1,
    )


def case_json_unsafe_values() -> Case:
    """Values msgpack carries but JSON cannot: they once crashed the agent's store writer."""
    env = envelope(stream="mixed")
    t = _t()
    ext = msgpack.ExtType(7, b"\x01\x02")
    good_tensor = {"name": "w", "dtype": "uint8", "shape": [1], "data": b"\x01"}
    return Case(
        [
            pack(env, [[protocol.EVENT, 0, t, 0, {"name": "e", "blob": b"\x00\x01"}]]),
            pack(env, [[protocol.EVENT, 1, t, 0, {"name": "e", "attrs": {"x": ext}}]]),
            pack(env, [[protocol.HELLO, 2, t, None, {"argv": ["x"], "cwd": ext}]]),
            pack(env, [[protocol.CONFIG, 3, t, None, {"params": {"when": msgpack.Timestamp(0)}}]]),
            pack(env, [[protocol.TEXT, 4, t, 0, {"name": "s", "text": "t", "raw": b"\xff"}]]),
            pack(env, [[protocol.TENSOR, 5, t, 0, {**good_tensor, "extra": b"\x00"}]]),
            pack(env, [[protocol.RUN_END, 6, t, None, {"exit_status": 0, "x": b"\x00"}]]),
            pack(env, [[protocol.PROBE_STATS, 7, t, None, {"invalid_values": "many"}]]),
            pack(env, [[protocol.PROBE_STATS, 8, t, None, {"internal_errors": math.inf}]]),
            pack(env, [[protocol.BYE, 9, t, None, {"produced": 10, "dropped": {"x": -1}}]]),
            pack(env, [[protocol.HELLO, 10, t, None, {b"bytes-key": 1}]]),
            # extra envelope keys are ignored, not stored: this message is good
            pack(envelope(stream="mixed", extra=b"\x00", more=ext), [scalars(11, 0, {"a": 1.0})]),
        ],
        rejected_records={"bad_record": 11},
        extra_good=1,
    )


CASES: dict[str, Callable[[], Case]] = {
    "garbage": case_garbage,
    "truncated": case_truncated,
    "wrong_shape": case_wrong_shape,
    "oversized": case_oversized,
    "wrong_version": case_wrong_version,
    "bad_envelope": case_bad_envelope,
    "mixed_records": case_mixed_records,
    "histogram_batches": case_histogram_batches,
    "deep_nesting": case_deep_nesting,
    "metric_limits": case_metric_limits,
    "json_unsafe_values": case_json_unsafe_values,
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_rejected_counted_and_good_input_keeps_flowing(
    name: str, agent: AgentProcess
) -> None:
    """Each kind of bad input is rejected by reason; interleaved good records are all stored."""
    case = CASES[name]()
    good = GoodStream(GOOD_RUN)
    run_dir = agent.run_dir(GOOD_RUN)
    with Pusher(agent.endpoint) as push:
        push.send(good.message(3))
        for raw in case.messages:
            push.send(raw)
            push.send(good.message(2))
        expected = good.sent + case.extra_good
        agent.wait_lines(GOOD_RUN, expected)
    assert agent.alive, agent.stderr()
    assert agent.stop() == 0, agent.stderr()

    stored = lines(run_dir)
    assert len(stored) == expected
    good_lines = [line for line in stored if line["stream"] == "good"]
    assert [line["seq"] for line in good_lines] == list(range(good.sent))
    assert all(line["metrics"]["loss"] == float(line["seq"]) for line in good_lines)

    info = run_info(run_dir)
    counters = info["agent"]
    assert counters["rejected_messages"] == case.rejected_messages
    assert counters["rejected_records"] == case.rejected_records
    assert counters["records"] == expected
    assert counters["messages"] == 1 + 2 * len(case.messages)
    good_stream = next(s for s in info["streams"] if s["stream"] == "good")
    assert (good_stream["received"], good_stream["gaps"]) == (good.sent, 0)
    # nothing was written outside the run store, and no run was made from a bad envelope
    assert sorted(p.name for p in agent.runs_dir.iterdir()) == [GOOD_RUN]
    assert not (agent.runs_dir.parent / "etc").exists()


def test_json_unsafe_records_do_not_poison_run_json(agent: AgentProcess) -> None:
    """After hostile hello/config bodies, run.json still holds the good trainer and config."""
    env = envelope(stream="t")
    t = _t()
    hello = {"argv": ["train.py"], "cwd": "/nonexistent", "python": "3.11"}
    with Pusher(agent.endpoint) as push:
        push.send(pack(env, [[protocol.HELLO, 0, t, None, {"argv": msgpack.ExtType(1, b"")}]]))
        push.send(pack(env, [[protocol.HELLO, 1, t, None, hello]]))
        push.send(pack(env, [[protocol.CONFIG, 2, t, None, {"params": {"lr": 0.5, "b": b"x"}}]]))
        params = {"lr": 0.25, "layers": [4, 8]}
        push.send(pack(env, [[protocol.CONFIG, 3, t, None, {"params": params}]]))
        agent.wait_lines(GOOD_RUN, 2, 20)
    assert agent.stop() == 0, agent.stderr()
    info = run_info(agent.run_dir(GOOD_RUN))
    assert info["trainer"] == hello
    assert info["config"] == {"lr": 0.25, "layers": [4, 8]}
    assert info["agent"]["rejected_records"] == {"bad_record": 2}


def test_nan_and_inf_metrics_are_stored_as_strings(agent: AgentProcess) -> None:
    """NaN/Inf metric values are stored as "NaN"/"Infinity"/"-Infinity", finite ones as numbers."""
    env = envelope(stream="nan")
    metrics = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "ok": 1.5, "int": 7}
    with Pusher(agent.endpoint) as push:
        push.send(pack(env, [scalars(0, 0, metrics), scalars(1, 1, {"ok": 2.5})]))
        agent.wait_lines(GOOD_RUN, 2, 20)
    assert agent.alive
    assert agent.stop() == 0, agent.stderr()
    stored = lines(agent.run_dir(GOOD_RUN))
    assert [line["metrics"] for line in stored] == [
        {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity", "ok": 1.5, "int": 7},
        {"ok": 2.5},
    ]
    assert math.isnan(float(stored[0]["metrics"]["nan"]))
    assert float(stored[0]["metrics"]["ninf"]) == -math.inf
    info = run_info(agent.run_dir(GOOD_RUN))
    assert info["agent"]["rejected_records"] == {}
    assert info["agent"]["records"] == 2


def test_many_distinct_metric_names_are_all_stored(agent: AgentProcess) -> None:
    """100k distinct metric names across records are stored; no per-name limit rejects them."""
    env = envelope(stream="wide")
    per_record = protocol.MAX_METRICS_PER_RECORD
    records = 100
    with Pusher(agent.endpoint) as push:
        for r in range(records):
            names = {f"layer{r}.unit{i}": float(i) for i in range(per_record)}
            push.send(pack(env, [scalars(r, r, names)]))
        agent.wait_lines(GOOD_RUN, records, 30)
    assert agent.stop() == 0, agent.stderr()
    stored = lines(agent.run_dir(GOOD_RUN))
    names = {name for line in stored for name in line["metrics"]}
    assert len(stored) == records
    assert len(names) == records * per_record
    info = run_info(agent.run_dir(GOOD_RUN))
    assert info["agent"]["rejected_records"] == {}
    assert info["agent"]["rejected_messages"] == {}


def test_message_over_zmq_cutoff_does_not_reach_or_stop_the_agent(agent: AgentProcess) -> None:
    """A message over twice the limit is cut off by ZeroMQ; the agent lives, other senders flow."""
    good = GoodStream(GOOD_RUN)
    huge = b"\x00" * (2 * protocol.MAX_MESSAGE_BYTES + 4096)
    with Pusher(agent.endpoint) as push, Pusher(agent.endpoint) as attacker:
        push.send(good.message(5))
        attacker.send(huge)
        push.send(good.message(5))
        agent.wait_lines(GOOD_RUN, good.sent, 20)
        assert agent.alive
        # the attacker reconnects and is served again, like anyone else
        attacker.send(good.message(5))
        agent.wait_lines(GOOD_RUN, good.sent, 20)
    assert agent.stop() == 0, agent.stderr()
    assert len(lines(agent.run_dir(GOOD_RUN))) == good.sent
    counters = run_info(agent.run_dir(GOOD_RUN))["agent"]
    assert counters["messages"] == 3  # the huge one never got past ZeroMQ
    assert counters["rejected_messages"] == {}


def test_too_many_runs_are_rejected_and_counted(agent: AgentProcess) -> None:
    """Past the open-run cap new run ids are rejected as too_many_runs; open runs keep storing."""
    from agent.store.registry import MAX_OPEN_RUNS

    good = GoodStream(GOOD_RUN)
    extra = MAX_OPEN_RUNS + 5  # GOOD_RUN is open too, so 6 of these are over the cap
    with Pusher(agent.endpoint) as push:
        push.send(good.message(1))
        for i in range(extra):
            push.send(pack(envelope(run=f"r{i:03d}", stream="s"), [scalars(0, 0, {"a": 1.0})]))
        push.send(good.message(1))
        agent.wait_lines(GOOD_RUN, 2, 30)
    assert agent.stop() == 0, agent.stderr()
    assert len(lines(agent.run_dir(GOOD_RUN))) == 2
    counters = run_info(agent.run_dir(GOOD_RUN))["agent"]
    assert counters["rejected_messages"] == {"too_many_runs": extra - (MAX_OPEN_RUNS - 1)}
    assert len(list(agent.runs_dir.iterdir())) == MAX_OPEN_RUNS


def test_rejection_log_lines_are_rate_limited(agent: AgentProcess) -> None:
    """1000 garbage messages and 1000 bad records give a few log lines, but exact counters."""
    good = GoodStream(GOOD_RUN)
    bad_records = [scalars(i, 0, {"x": "not a number"}) for i in range(100)]
    with Pusher(agent.endpoint) as push:
        push.send(good.message(1))
        for i in range(1000):
            push.send(b"\xc1garbage %d" % i)
        for _ in range(10):
            push.send(pack(envelope(stream="bad"), bad_records))
        push.send(good.message(1))
        agent.wait_lines(GOOD_RUN, 2, 30)
    assert agent.stop() == 0
    counters = run_info(agent.run_dir(GOOD_RUN))["agent"]
    assert counters["rejected_messages"] == {"malformed": 1000}
    assert counters["rejected_records"] == {"bad_record": 1000}
    log = agent.stderr().splitlines()
    assert 1 <= sum("rejected a message" in line for line in log) <= 3, log
    assert 1 <= sum("rejected a record" in line for line in log) <= 3, log
    assert len(log) < 12, log


def test_agent_survives_garbage_from_many_sockets_at_once(agent: AgentProcess) -> None:
    """Several sockets sending garbage beside a good one leave every good record stored."""
    good = GoodStream(GOOD_RUN)
    pushers = [Pusher(agent.endpoint) for _ in range(4)]
    try:
        for round_ in range(50):
            for i, pusher in enumerate(pushers):
                pusher.send(bytes([0xC1, i, round_ % 256]) * 10)
            pushers[0].send(good.message(2))
        agent.wait_lines(GOOD_RUN, good.sent, 20)
    finally:
        for pusher in pushers:
            pusher.close()
    assert agent.alive
    agent.signal(signal.SIGTERM)
    assert agent.process.wait(15) == 0
    assert len(lines(agent.run_dir(GOOD_RUN))) == good.sent
    counters = run_info(agent.run_dir(GOOD_RUN))["agent"]
    assert counters["rejected_messages"] == {"malformed": 200}
