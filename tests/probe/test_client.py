"""The probe in this process, talking to a real agent process."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import zmq

import probe
from agent.ingest.decode import Record, decode
from probe import internal
from probe.sender import DEFAULT_BUSY_FLUSH_INTERVAL
from tests.helpers import every_core_busy, lines, run_info, stop_agent, trainer_streams, wait_for


def stored_run(agent, runs_dir: Path, run_id: str) -> tuple[list[dict], dict]:
    """Finish the probe, stop the agent, and read back what it stored."""
    probe.finish()
    assert stop_agent(agent) == 0
    run_dir = runs_dir / run_id
    return lines(run_dir), run_info(run_dir)


def test_tensor_values_are_snapshotted_at_log_time(agent, endpoint: str, runs_dir: Path) -> None:
    """A 0-d tensor changed in place after probe.log is stored with its value at the call."""
    assert probe.init(endpoint, run_id="snapshot")
    running = torch.tensor(1.0)
    weight = torch.tensor(2.0, requires_grad=True)
    loss = weight * 3
    probe.log({"running": running, "loss": loss, "n": np.float32(0.25)}, step=1)
    running += 41.0
    stored, _ = stored_run(agent, runs_dir, "snapshot")
    [record] = [line for line in stored if line["kind"] == "scalars"]
    assert record["metrics"] == {"running": 1.0, "loss": 6.0, "n": 0.25, "loss_nonfinite": 0}


def test_bad_values_are_skipped_counted_and_never_raise(
    agent, endpoint: str, runs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A string or a vector in probe.log is dropped alone, counted, and warned about once."""
    probe.init(endpoint, run_id="bad-values")
    internal.RAISE = False  # user mistakes are not internal errors, but check both ways
    for step in range(3):
        probe.log({"loss": 0.5, "name": "resnet", "vec": torch.ones(3)}, step=step)
    probe.log(None, step=4)  # type: ignore[arg-type]
    stored, info = stored_run(agent, runs_dir, "bad-values")
    scalars = [line["metrics"] for line in stored if line["kind"] == "scalars"]
    assert scalars == [{"loss": 0.5, "loss_nonfinite": 0}] * 3
    [stream] = trainer_streams(info)
    assert stream["invalid_values"] == 6
    warnings = [r.getMessage() for r in caplog.records if "metric 'name'" in r.getMessage()]
    assert len(warnings) == 1


def test_queue_overflow_is_counted_exactly(agent, endpoint: str, runs_dir: Path) -> None:
    """With a tiny queue the training thread drops instead of waiting, and says how many."""
    probe.init(endpoint, run_id="overflow", queue_size=8, connect_grace=5.0)
    for step in range(5000):
        probe.log({"loss": 1.0}, step=step)
    stored, info = stored_run(agent, runs_dir, "overflow")
    [stream] = trainer_streams(info)
    dropped = stream["dropped"].get("queue_full", 0)
    kept = sum(1 for line in stored if line["kind"] == "scalars")
    assert dropped > 0
    assert kept + dropped == 5000
    assert stream["received"] + sum(stream["dropped"].values()) + stream["lost"] == stream["sent"]
    assert stream["lost"] == 0


def test_flush_waits_for_delivery(agent, endpoint: str, runs_dir: Path) -> None:
    """After probe.flush returns True, the agent has everything logged before it."""
    probe.init(endpoint, run_id="flushed")
    for step in range(300):
        probe.log({"loss": 1.0}, step=step)
    assert probe.flush(10.0)
    assert probe.stats()["sent"] >= 300
    probe.log({"loss": 2.0}, step=300)
    assert probe.flush(10.0)
    assert probe.stats()["queue_depth"] == 0


def test_tensor_records_round_trip_to_the_store(agent, endpoint: str, runs_dir: Path) -> None:
    """probe.tensor ships dtype, shape and bytes; tensors.bin holds exactly those bytes."""
    probe.init(endpoint, run_id="tensors")
    features = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    probe.tensor("features/h", features, step=7)
    probe.tensor("counts", np.arange(5, dtype=np.int64), step=7)
    probe.tensor("huge", torch.zeros(4096, 1024), step=7)  # 16 MiB: over the limit
    stored, info = stored_run(agent, runs_dir, "tensors")
    tensors = {line["name"]: line for line in stored if line["kind"] == "tensor"}
    assert set(tensors) == {"features/h", "counts"}
    blob = (runs_dir / "tensors" / "tensors.bin").read_bytes()
    h = tensors["features/h"]
    assert (h["dtype"], h["shape"]) == ("float32", [3, 4])
    data = blob[h["offset"] : h["offset"] + h["nbytes"]]
    assert np.array_equal(np.frombuffer(data, np.float32).reshape(3, 4), features.numpy())
    [stream] = trainer_streams(info)
    assert stream["dropped"] == {"too_large": 1}


def test_bad_init_arguments_raise_at_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set-up mistakes raise ValueError at init, the only place the probe raises."""
    with pytest.raises(ValueError, match="queue_size"):
        probe.init("ipc:///tmp/nowhere.sock", queue_size=0)
    for name, variable, bads in (
        ("flush_interval", "OUTRIDER_FLUSH_INTERVAL", (-0.1, 5.5, float("nan"))),
        ("busy_flush_interval", "OUTRIDER_BUSY_FLUSH_INTERVAL", (-1.0, 6.0, float("nan"))),
    ):
        for bad in bads:
            with pytest.raises(ValueError, match=f"{name} must be 0 to 5 seconds"):
                probe.init("ipc:///tmp/nowhere.sock", **{name: bad})
        monkeypatch.setenv(variable, "fast")
        with pytest.raises(ValueError, match=f"{variable} must be a number of seconds"):
            probe.init("ipc:///tmp/nowhere.sock")
        monkeypatch.setenv(variable, "60")
        with pytest.raises(ValueError, match=name):
            probe.init("ipc:///tmp/nowhere.sock")
        monkeypatch.delenv(variable)


def test_disabled_probe_is_a_no_op(endpoint: str) -> None:
    """enabled=False (or OUTRIDER_DISABLED=1) turns every call into a no-op."""
    assert not probe.init(endpoint, enabled=False)
    probe.log({"loss": 1.0}, step=0)
    probe.text("t", "x")
    assert probe.stats() == {}
    assert probe.flush(0.1) and probe.finish()


def test_thread_start_failure_is_survived(
    endpoint: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """If Python refuses a new thread (interpreter shutdown), logging goes on without raising."""

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    probe.init(endpoint, run_id="no-thread")
    probe.log({"loss": 1.0}, step=0)
    assert not probe.flush(0.2)
    started = time.monotonic()
    probe.finish(0.2)
    assert time.monotonic() - started < 2.0, "finish hung without a sender thread"
    assert any("cannot start the sender thread" in r.getMessage() for r in caplog.records)


def test_init_after_finish_starts_a_new_stream(agent, endpoint: str, runs_dir: Path) -> None:
    """finish() then init() (e.g. a sweep in one process) opens a second, complete stream."""
    probe.init(endpoint, run_id="sweep-a")
    probe.log({"loss": 1.0}, step=0)
    probe.finish()
    probe.log({"loss": 9.0}, step=1)  # after finish and before init: a no-op
    assert probe.init(endpoint, run_id="sweep-b")
    probe.log({"loss": 2.0}, step=0)
    probe.finish()
    assert stop_agent(agent) == 0
    for run_id, loss in (("sweep-a", 1.0), ("sweep-b", 2.0)):
        stored = lines(runs_dir / run_id)
        assert [line["metrics"]["loss"] for line in stored if line["kind"] == "scalars"] == [loss]
        [stream] = trainer_streams(run_info(runs_dir / run_id))
        assert stream["complete"] and stream["lost"] == 0


@pytest.fixture
def pull(endpoint: str) -> Iterator[tuple[str, zmq.Socket[bytes]]]:
    """A real PULL socket bound where the probe will send: its endpoint and the socket."""
    context = zmq.Context()
    socket = context.socket(zmq.PULL)
    socket.bind(endpoint)
    yield endpoint, socket
    socket.close(linger=0)
    context.term()


def _message_kinds(pull: zmq.Socket[bytes], quiet_ms: int = 2000) -> list[list[str]]:
    """What each message read from ``pull`` until ``quiet_ms`` pass without one held: its
    records' kinds, a block as its rows."""
    kinds = []
    while pull.poll(quiet_ms):
        message = decode(pull.recv())
        kinds.append(
            [
                kind
                for r in message.records
                for kind in ([r.kind] if isinstance(r, Record) else ["scalars"] * len(r))
            ]
        )
    return kinds


def test_control_records_ride_in_the_steps_message(
    pull: tuple[str, zmq.Socket[bytes]],
) -> None:
    """The probe's counters and heartbeat go in the same message as the step's records, so
    the agent wakes once a step, not twice. A real PULL socket reads what the probe sends."""
    endpoint, socket = pull
    # Counters due at every wake-up: a step of 0.1 s, as a trainer's.
    probe.init(endpoint=endpoint, run_id="one-message", stats_interval=0.01)
    steps = 6
    for step in range(steps):
        time.sleep(0.1)
        probe.log({"loss": 1.0 / (step + 1)}, step=step)
    probe.finish()
    kinds = [set(message) for message in _message_kinds(socket)]
    with_scalars = [k for k in kinds if "scalars" in k]
    assert len(with_scalars) == steps
    # Counters after a step's send changed: each later step's message carries them.
    assert sum("probe_stats" in k for k in with_scalars) >= steps - 1
    # Between the steps no message of control records alone (at the end the final
    # counters may go by themselves, before the bye).
    last_step = max(i for i, k in enumerate(kinds) if "scalars" in k)
    alone = [k for k in kinds[:last_step] if k <= {"probe_stats", "heartbeat"}]
    assert alone == [], kinds


@pytest.mark.serial  # it takes every core: beside another worker, that worker's runs starve
def test_steps_merge_into_fewer_messages_while_every_core_is_busy(
    pull: tuple[str, zmq.Socket[bytes]],
) -> None:
    """With a spinning process on every core, the sender reads the machine as busy and
    lets records gather for busy_flush_interval: eight steps logged 50 ms apart, each its
    own message on a quiet machine, go as one or two."""
    endpoint, socket = pull
    options = {"stats_interval": 60.0, "heartbeat_interval": 60.0}
    with every_core_busy():
        probe.init(endpoint=endpoint, run_id="busy", busy_flush_interval=1.0, **options)
        assert probe.flush(timeout=10.0)  # connected, hello sent
        wait_for(
            lambda: probe.stats()["flush_window"] == 1.0, 10.0, "the probe to read every core busy"
        )
        _message_kinds(socket, quiet_ms=300)
        for step in range(8):
            probe.log({"loss": 1.0 / (step + 1)}, step=step)
            time.sleep(0.05)
        merged = [kinds.count("scalars") for kinds in _message_kinds(socket, quiet_ms=2500)]
    probe.finish()
    assert sum(merged) == 8
    assert len([count for count in merged if count]) <= 2, merged


@pytest.mark.parametrize(
    ("busy", "window"), [(None, DEFAULT_BUSY_FLUSH_INTERVAL), (0.0, 0.02), (0.01, 0.02)]
)
def test_the_busy_window_defaults_and_never_undercuts_flush_interval(
    monkeypatch: pytest.MonkeyPatch, busy: float | None, window: float
) -> None:
    """Without an argument or OUTRIDER_BUSY_FLUSH_INTERVAL the busy window is the default;
    0, or anything under flush_interval, keeps flush_interval on busy cores too."""
    monkeypatch.delenv("OUTRIDER_BUSY_FLUSH_INTERVAL")
    probe.init("ipc:///tmp/nowhere.sock", busy_flush_interval=busy, flush_interval=0.02)
    sender = probe._client.sender  # type: ignore[union-attr]
    sender.core_load.busy = True  # as a reading of every core busy leaves it
    assert sender.window == window
    probe.finish(timeout=0.1)


@pytest.mark.parametrize("source", ["argument", "environment"])
def test_a_longer_flush_interval_merges_steps_into_one_message(
    pull: tuple[str, zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch, source: str
) -> None:
    """With flush_interval 2 s, four steps logged 50 ms apart go as one message; flush()
    still sends at once rather than waiting out the window."""
    endpoint, socket = pull
    # no counters or heartbeats between the steps: the messages are the steps'
    options = {"stats_interval": 60.0, "heartbeat_interval": 60.0}
    if source == "argument":
        options["flush_interval"] = 2.0
    else:
        monkeypatch.setenv("OUTRIDER_FLUSH_INTERVAL", "2")
    probe.init(endpoint=endpoint, run_id="merged", **options)
    assert probe.flush(timeout=10.0)  # connected, hello sent
    _message_kinds(socket, quiet_ms=300)
    for step in range(4):
        probe.log({"loss": 1.0 / (step + 1)}, step=step)
        time.sleep(0.05)
    started = time.monotonic()
    assert probe.flush(timeout=10.0)
    flushed_in = time.monotonic() - started
    merged = _message_kinds(socket, quiet_ms=300)
    probe.finish()
    assert [kinds.count("scalars") for kinds in merged] == [4], merged
    assert flushed_in < 1.0
