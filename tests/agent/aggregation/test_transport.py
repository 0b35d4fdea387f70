"""Node uplink to aggregator listener over real TCP on loopback, the listener in its own
process: CURVE, wrong keys, an aggregator that starts late or is killed, backlog and spool.

Every test ends on the accounting identity the tier promises:
``received + dropped + lost == sent`` per uplink stream, with ``sent`` exact after bye.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.aggregation import wire
from agent.aggregation.keys import KeyFileError, create_keys
from agent.aggregation.listener import Listener
from agent.aggregation.uplink import Uplink
from tests.helpers import PYTHON, REPO, wait_for

JOB = "job-1"


class ListenerProcess:
    """``tests.agent.aggregation.listener_process`` in its own process."""

    def __init__(
        self, work: Path, bind: str, keys_dir: Path | None, restore: Path | None = None
    ) -> None:
        work.mkdir(parents=True, exist_ok=True)
        self.state_path = work / "state.json"
        self.stderr_path = work / "stderr"
        self._stderr = open(self.stderr_path, "wb")  # noqa: SIM115 - closed in stop()/kill()
        argv = [
            PYTHON,
            "-P",
            "-m",
            "tests.agent.aggregation.listener_process",
            bind,
            str(keys_dir) if keys_dir is not None else "-",
            str(self.state_path),
        ]
        if restore is not None:
            argv.append(str(restore))
        self.process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=dict(os.environ, PYTHONPATH=str(REPO)),
        )
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], 20.0)
        line = self.process.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("tcp://"):
            self.kill()
            raise AssertionError(f"listener did not start: {self.stderr()}")
        self.endpoint = line

    def state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {}
        return orjson.loads(self.state_path.read_bytes())  # type: ignore[no-any-return]

    def ledger(self) -> dict[str, Any]:
        """The one uplink stream's ledger summary ({} before its first item)."""
        ledgers = self.state().get("ledgers", [])
        assert len(ledgers) <= 1, ledgers
        return ledgers[0] if ledgers else {}

    def stream(self) -> dict[str, Any]:
        streams = self.state().get("streams", {})
        return next(iter(streams.values())) if streams else {}

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(15)
        self._stderr.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(15)
        self._stderr.close()


def free_port() -> int:
    with socket.socket() as probe_socket:
        probe_socket.bind(("127.0.0.1", 0))
        return int(probe_socket.getsockname()[1])


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return create_keys(tmp_path / "keys").directory


@pytest.fixture
def listeners() -> Iterator[list[ListenerProcess]]:
    started: list[ListenerProcess] = []
    yield started
    for listener in started:
        listener.kill()


def balanced(ledger: dict[str, Any]) -> bool:
    dropped = sum(ledger["dropped"].values())
    return bool(ledger["received"] + dropped + ledger["lost"] == ledger["sent"])


def complete(listener: ListenerProcess) -> dict[str, Any]:
    """The stream's ledger once it has said bye."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: (ledger := listener.ledger()).get("complete") and ledger,
        20.0,
        f"the uplink's bye at the listener ({listener.stderr()})",
    )


def window(uplink: Uplink, first: int, count: int) -> None:
    for i in range(first, first + count):
        uplink.forward(JOB, wire.WINDOW, {"i": i, "rank": 0, "loss": 1.0 / (i + 1)})


def test_curve_items_arrive_in_order_with_exact_counts(
    tmp_path: Path, keys: Path, listeners: list[ListenerProcess]
) -> None:
    """With CURVE, every item arrives once, in order, and the counts at both ends agree."""
    listener = ListenerProcess(tmp_path / "a", "tcp://127.0.0.1:0", keys)
    listeners.append(listener)
    uplink = Uplink(listener.endpoint, "node-a", keys_dir=keys, heartbeat_seconds=0.1)
    uplink.start()
    window(uplink, 0, 2000)
    uplink.forward(JOB, wire.ACCOUNTING, {"streams": [{"stream": "s", "sent": 3}]})
    wait_for(lambda: listener.ledger().get("received", 0) >= 2002, 20.0, "2002 items")
    uplink.close(5.0)
    ledger = complete(listener)
    stats = uplink.stats()["jobs"][JOB]
    assert ledger["sent"] == stats["produced"] == stats["sent"] == ledger["received"]
    assert ledger["dropped"] == {} and ledger["lost"] == 0 and ledger["duplicates"] == 0
    assert listener.stream()["windows"] == 2000
    assert listener.stream()["out_of_order"] == 0
    state = listener.state()
    assert state["rejected"] == {}
    assert state["counters"]["handshakes"] >= 1 and state["counters"]["handshake_failures"] == 0


def test_wrong_keys_are_refused_and_counted(
    tmp_path: Path, keys: Path, listeners: list[ListenerProcess]
) -> None:
    """A node holding another job's keys gets nothing through; the listener counts the
    failed handshakes and the node counts everything as dropped at shutdown."""
    other = create_keys(tmp_path / "other").directory
    listener = ListenerProcess(tmp_path / "a", "tcp://127.0.0.1:0", keys)
    listeners.append(listener)
    uplink = Uplink(listener.endpoint, "node-a", keys_dir=other)
    uplink.start()
    window(uplink, 0, 10)
    wait_for(
        lambda: listener.state().get("counters", {}).get("handshake_failures", 0) >= 1,
        20.0,
        "a failed handshake at the listener",
    )
    uplink.close(0.5)
    stats = uplink.stats()
    assert not stats["connected"]
    assert stats["jobs"][JOB]["dropped"] == {"shutdown": stats["jobs"][JOB]["produced"]}
    assert listener.state()["messages"] == 0
    assert listener.state()["ledgers"] == []


def test_unknown_node_key_is_refused_by_name(
    tmp_path: Path, keys: Path, listeners: list[ListenerProcess]
) -> None:
    """A node that knows the aggregator's key but holds a key it does not trust is refused
    by the authenticator, which logs the node's address and key."""
    other = create_keys(tmp_path / "other").directory
    shutil.copy(keys / "aggregator.key", other / "aggregator.key")
    listener = ListenerProcess(tmp_path / "a", "tcp://127.0.0.1:0", keys)
    listeners.append(listener)
    uplink = Uplink(listener.endpoint, "node-a", keys_dir=other)
    uplink.start()
    window(uplink, 0, 10)
    wait_for(
        lambda: "refused a node at 127.0.0.1" in listener.stderr(),
        20.0,
        "the listener's complaint naming the peer",
    )
    uplink.close(0.5)
    assert listener.state()["messages"] == 0
    assert listener.state()["counters"]["handshake_failures"] >= 1
    assert uplink.stats()["handshake_failures"] >= 1


def test_keys_are_required_off_loopback(tmp_path: Path) -> None:
    """Plain TCP is refused off loopback unless insecure; missing key files are named."""
    with pytest.raises(ValueError, match="outrider keys"):
        Uplink("tcp://192.0.2.7:5555", "node-a", keys_dir=None)
    with pytest.raises(ValueError, match="not on loopback"):
        Listener("tcp://0.0.0.0:0", keys_dir=None)
    Uplink("tcp://192.0.2.7:5555", "node-a", keys_dir=None, insecure=True).close(0.1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KeyFileError, match=r"node\.key_secret is missing"):
        Uplink("tcp://192.0.2.7:5555", "node-a", keys_dir=empty)
    with pytest.raises(KeyFileError, match=r"aggregator\.key_secret is missing"):
        Listener("tcp://0.0.0.0:0", keys_dir=empty)
    with pytest.raises(ValueError, match="tcp://HOST:PORT"):
        Uplink("ipc:///tmp/x", "node-a", keys_dir=None)


def test_plain_loopback_works_and_bad_items_are_counted(
    tmp_path: Path, listeners: list[ListenerProcess]
) -> None:
    """Without keys on loopback it runs plain TCP; items the aggregator would refuse are
    dropped at the node by reason, and the identity still holds."""
    listener = ListenerProcess(tmp_path / "a", "tcp://127.0.0.1:0", None)
    listeners.append(listener)
    uplink = Uplink(listener.endpoint, "node-a", keys_dir=None)
    uplink.start()
    window(uplink, 0, 50)
    uplink.forward(JOB, wire.WINDOW, {"x": object()})  # msgpack cannot carry it
    uplink.forward(JOB, wire.WINDOW, {1: "non-string key"})  # the aggregator would refuse
    uplink.forward(JOB, "no-such-kind", {})
    uplink.forward("not a job id!", wire.WINDOW, {})
    window(uplink, 50, 50)
    uplink.close(5.0)
    ledger = complete(listener)
    assert ledger["dropped"] == {"unencodable": 1, "invalid": 2}
    assert ledger["lost"] == 0 and balanced(ledger)
    assert listener.stream()["windows"] == 100
    assert uplink.stats()["jobs"]["not a job id!"]["dropped"] == {"invalid": 2}  # hello too
    assert listener.state()["rejected"] == {}


def test_aggregator_that_starts_late_gets_the_backlog(
    tmp_path: Path, listeners: list[ListenerProcess]
) -> None:
    """Items forwarded before the aggregator exists wait in the backlog and all arrive."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    uplink = Uplink(endpoint, "node-a", keys_dir=None)
    uplink.start()
    window(uplink, 0, 500)
    assert uplink.stats()["jobs"][JOB]["backlog"] == 501  # hello + 500
    listener = ListenerProcess(tmp_path / "a", endpoint, None)
    listeners.append(listener)
    wait_for(lambda: listener.ledger().get("received", 0) >= 501, 20.0, "the backlog")
    uplink.close(5.0)
    ledger = complete(listener)
    assert ledger["dropped"] == {} and ledger["lost"] == 0
    assert ledger["received"] == ledger["sent"] == uplink.stats()["jobs"][JOB]["produced"]
    assert listener.stream()["windows"] == 500 and listener.stream()["out_of_order"] == 0


def test_aggregator_killed_midstream_loss_is_counted(
    tmp_path: Path, keys: Path, listeners: list[ListenerProcess]
) -> None:
    """SIGKILL the aggregator mid-stream and restart it on the same port, restored from
    what it last wrote: whatever vanished is counted as lost, never silently."""
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    first = ListenerProcess(tmp_path / "a", endpoint, keys)
    listeners.append(first)
    uplink = Uplink(endpoint, "node-a", keys_dir=keys, heartbeat_seconds=0.2)
    uplink.start()
    window(uplink, 0, 300)
    wait_for(lambda: first.ledger().get("received", 0) >= 301, 20.0, "the first 300 items")
    window(uplink, 300, 300)
    first.kill()
    window(uplink, 600, 300)
    wait_for(lambda: not uplink.stats()["connected"], 20.0, "the uplink to see the loss")
    window(uplink, 900, 300)
    second = ListenerProcess(tmp_path / "b", endpoint, keys, restore=first.state_path)
    listeners.append(second)
    wait_for(lambda: uplink.stats()["reconnects"] >= 1, 20.0, "a reconnect")
    window(uplink, 1200, 300)
    uplink.close(5.0)
    ledger = complete(second)
    stats = uplink.stats()["jobs"][JOB]
    assert ledger["sent"] == stats["produced"]
    assert ledger["dropped"] == stats["dropped"] == {}
    assert balanced(ledger)
    assert ledger["received"] >= first.ledger()["received"] + 300  # the items after restart
    assert second.stream()["out_of_order"] == 0


def test_backlog_overflow_is_counted(tmp_path: Path, listeners: list[ListenerProcess]) -> None:
    """Past the backlog's cap items are dropped as backlog_full, and the aggregator hears
    exactly how many."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    uplink = Uplink(endpoint, "node-a", keys_dir=None, backlog=100)
    uplink.start()
    window(uplink, 0, 1000)
    stats = uplink.stats()["jobs"][JOB]
    assert stats["backlog"] == 100
    assert stats["dropped"] == {"backlog_full": 901}  # 1000 windows + hello, 100 kept
    listener = ListenerProcess(tmp_path / "a", endpoint, None)
    listeners.append(listener)
    wait_for(lambda: listener.ledger().get("received", 0) >= 100, 20.0, "the backlog")
    uplink.close(5.0)
    ledger = complete(listener)
    assert ledger["dropped"] == {"backlog_full": 901}
    assert ledger["lost"] == 0 and balanced(ledger)
    assert listener.stream()["windows"] == 99


def test_spool_keeps_an_outage_and_replays_it_in_order(
    tmp_path: Path, listeners: list[ListenerProcess]
) -> None:
    """With a small memory backlog and a spool, an outage loses nothing: the spool replays
    in order when the aggregator is back, and its files are gone after close."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    spool = tmp_path / "spool"
    uplink = Uplink(endpoint, "node-a", keys_dir=None, backlog=50, spool_dir=spool)
    uplink.start()
    for first in range(0, 1000, 20):
        window(uplink, first, 20)
        wait_for(lambda: uplink.stats()["jobs"][JOB]["backlog"] < 25, 20.0, "a spill")
    stats = uplink.stats()["jobs"][JOB]
    assert stats["dropped"] == {}
    assert stats["spooled"] + stats["backlog"] == 1001 and stats["spooled"] >= 950
    assert [p.suffix for p in spool.iterdir()] == [".spool"]
    listener = ListenerProcess(tmp_path / "a", endpoint, None)
    listeners.append(listener)
    wait_for(lambda: listener.ledger().get("received", 0) >= 1001, 30.0, "the spool")
    uplink.close(5.0)
    ledger = complete(listener)
    assert ledger["dropped"] == {} and ledger["lost"] == 0
    assert ledger["received"] == ledger["sent"]
    assert listener.stream()["windows"] == 1000 and listener.stream()["out_of_order"] == 0
    assert list(spool.iterdir()) == []


def test_full_spool_is_counted(tmp_path: Path, listeners: list[ListenerProcess]) -> None:
    """Past the spool's byte cap items are dropped as spool_full; the identity holds."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    uplink = Uplink(
        endpoint, "node-a", keys_dir=None, backlog=20, spool_dir=tmp_path / "s", spool_bytes=2000
    )
    uplink.start()
    for first in range(0, 400, 10):
        window(uplink, first, 10)
        wait_for(
            lambda: uplink.stats()["jobs"][JOB]["backlog"] < 10 or uplink.stats()["spool_full"],
            20.0,
            "a spill or a full spool",
        )
    stats = uplink.stats()["jobs"][JOB]
    assert set(stats["dropped"]) == {"spool_full"}
    assert stats["spooled"] > 0
    listener = ListenerProcess(tmp_path / "a", endpoint, None)
    listeners.append(listener)
    uplink.close(5.0)
    ledger = complete(listener)
    assert ledger["dropped"] == uplink.stats()["jobs"][JOB]["dropped"]
    assert ledger["lost"] == 0 and balanced(ledger)
    assert listener.stream()["out_of_order"] == 0


def test_forward_never_waits_for_a_missing_aggregator() -> None:
    """100k forwards with nobody listening: each is kept or counted, none waits; close is
    bounded and counts what it could not send."""
    uplink = Uplink(f"tcp://127.0.0.1:{free_port()}", "node-a", keys_dir=None)
    uplink.start()
    window(uplink, 0, 100_000)
    stats = uplink.stats()["jobs"][JOB]
    assert stats["produced"] == 100_001
    assert stats["backlog"] == 10_000
    assert stats["dropped"] == {"backlog_full": 90_001}
    uplink.close(0.2)
    stats = uplink.stats()["jobs"][JOB]
    assert stats["dropped"] == {"backlog_full": 90_001, "shutdown": 10_001}  # and the bye
    assert stats["produced"] == 100_002
    uplink.forward(JOB, wire.WINDOW, {})  # after close: counted, never raised
    assert uplink.stats()["jobs"][JOB]["dropped"]["shutdown"] == 10_002
