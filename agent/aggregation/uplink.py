"""The node side of the aggregation tier: forward items to the job aggregator, never blocking.

The node agent's receive loop calls ``forward``, which numbers the item and
appends it to a bounded in-memory backlog: O(1), no socket, no disk, no
exception. A thread of the uplink's own owns the ZeroMQ socket (PUSH,
IMMEDIATE, a small high-water mark, reconnect backoff, ZMTP heartbeats, a
finite LINGER) and sends the backlog in batches, one job stream per message.

While the aggregator is away, items wait in the backlog; with a spool
directory, the older half of a filling backlog moves to a file on disk and is
replayed in order when the aggregator is back. Past the caps an item is
dropped and counted by reason. The counters (``produced`` and ``dropped``,
taken together) ride in every heartbeat, accounting and bye item, so the
aggregator's ledger (``agent.aggregation.ledger``) holds
``received + dropped + lost == sent`` for each stream.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import secrets
import struct
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import zmq
from zmq.utils.monitor import recv_monitor_message

from agent.aggregation import wire
from agent.aggregation.endpoint import use_curve
from agent.aggregation.keys import node_keys
from agent.ingest.decode import RUN_ID
from sinks.ratelimit import RateLimitedLog

logger = logging.getLogger("outrider.agent.uplink")

QueuedItem = tuple[str, int, float, dict[str, Any]]

#: the most a message carries; a batch is cut at whichever comes first
MAX_BATCH = 512
BATCH_BYTES = 256 * 1024
#: messages ZeroMQ may hold for a connected aggregator; the rest waits in our own backlog
SEND_HWM = 16
#: seconds a partly filled batch waits for more items before it is sent
FLUSH_SECONDS = 0.02
#: how often the thread looks for a connection while none is up
DISCONNECTED_POLL = 0.1
_FRAME = struct.Struct(">I")
_MONITOR_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class Spool:
    """One job stream's overflow on disk, oldest first: length-prefixed packed items.

    Read from the front while written at the end; emptied (truncated) once
    everything in it has been sent. Lives as long as the uplink (a restarted
    node agent is a new stream and starts a fresh spool).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file: BinaryIO = open(path, "w+b")  # noqa: SIM115 - closed in close()
        self.read_at = 0
        self.write_at = 0
        self.count = 0

    def append(self, frames: list[bytes]) -> None:
        self.file.seek(self.write_at)
        self.file.write(b"".join(_FRAME.pack(len(frame)) + frame for frame in frames))
        self.file.flush()
        self.write_at = self.file.tell()
        self.count += len(frames)

    def take(self, max_items: int, max_bytes: int) -> list[bytes]:
        """Up to ``max_items`` frames (and about ``max_bytes``) from the front."""
        frames: list[bytes] = []
        size = 0
        self.file.seek(self.read_at)
        while self.count and len(frames) < max_items and (not frames or size < max_bytes):
            (length,) = _FRAME.unpack(self.file.read(_FRAME.size))
            frames.append(self.file.read(length))
            size += length
            self.count -= 1
        self.read_at = self.file.tell()
        if not self.count:
            self.file.truncate(0)
            self.read_at = self.write_at = 0
        return frames

    def clear(self) -> None:
        self.file.truncate(0)
        self.read_at = self.write_at = self.count = 0

    def close(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            self.path.unlink()


class _Stream:
    """One (job, node, agent) stream: its seqs, counters and what waits to be sent."""

    def __init__(self, job: str, header: bytes | None) -> None:
        self.job = job
        self.header = header  # None when the job id is one the aggregator would refuse
        self.produced = 0
        self.sent = 0
        self.dropped: dict[str, int] = {}
        self.queue: collections.deque[QueuedItem] = collections.deque()
        self.pending: collections.deque[bytes] = collections.deque()  # packed, not yet sent
        self.spool: Spool | None = None
        self.last_beat = time.monotonic()
        self.ended = False  # said bye; no heartbeats until it forwards again

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def counters(self) -> dict[str, Any]:
        """``produced`` and ``dropped`` as one snapshot: every dropped seq is below produced."""
        return {"produced": self.produced, "dropped": dict(self.dropped)}

    @property
    def spooled(self) -> int:
        return self.spool.count if self.spool is not None else 0

    @property
    def unsent(self) -> bool:
        return bool(self.queue or self.pending or self.spooled)


class Uplink:
    """Forwards a node agent's items to the job aggregator; see the module docstring."""

    def __init__(
        self,
        endpoint: str,
        node: str,
        *,
        keys_dir: Path | None,
        insecure: bool = False,
        backlog: int = 10_000,
        spool_dir: Path | None = None,
        spool_bytes: int = 64 << 20,
        heartbeat_seconds: float = 2.0,
        linger_seconds: float = 1.0,
    ) -> None:
        if type(node) is not str or not 0 < len(node) <= wire.MAX_NAME_CHARS:
            raise ValueError(f"node label must be 1-{wire.MAX_NAME_CHARS} characters")
        if backlog < 1 or spool_bytes < 0 or heartbeat_seconds <= 0 or linger_seconds < 0:
            raise ValueError("backlog must be >= 1, heartbeat_seconds > 0, the rest >= 0")
        self.endpoint = endpoint
        self.node = node
        self.curve = use_curve(endpoint, keys_dir, insecure, "aggregator")
        self._keys = node_keys(keys_dir) if self.curve and keys_dir is not None else None
        self.backlog = backlog
        self.spool_dir = spool_dir
        self.spool_bytes = spool_bytes
        self.heartbeat_seconds = heartbeat_seconds
        self.linger_seconds = linger_seconds
        self.agent_id = secrets.token_hex(8)
        self.pid = os.getpid()

        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._queued = 0  # items in every stream's memory backlog
        self._spill_mark = backlog // 2 if spool_dir is not None else -1
        self._spool_full = False
        self._spool_broken = False
        self._closing = False  # forward drops as "shutdown" from here on
        self._stopping = False
        self._deadline = 0.0
        self._thread: threading.Thread | None = None
        self.connected = False
        self.reconnects = 0
        self.handshake_failures = 0
        self.internal_errors = 0
        self._ever_connected = False
        self._complaints = RateLimitedLog(log=logger)

    # -- the caller's side -------------------------------------------------
    def forward(self, job: str, kind: str, body: dict[str, Any]) -> None:
        """Queue one item for ``job``'s stream; O(1), never blocks, never raises.

        The uplink keeps ``body`` (the caller must not change it afterwards).
        A ``bye`` ends the job's stream: its heartbeats stop until it forwards again.
        """
        try:
            with self._lock:
                stream = self._streams.get(job)
                if stream is None:
                    stream = self._open(job)
                self._add(stream, kind, body)
                queued = self._queued
            if queued == 1 or queued == MAX_BATCH or queued == self._spill_mark:
                self._wake.set()
        except Exception:  # a bug here must never reach the node agent's loop
            self.internal_errors += 1

    def end(self, job: str) -> None:
        """Say bye on ``job``'s stream (a run that finished); same as forwarding a bye."""
        self.forward(job, wire.BYE, {})

    def _open(self, job: str) -> _Stream:
        header = None
        if type(job) is str and RUN_ID.match(job):
            envelope = {"job": job, "node": self.node, "agent": self.agent_id, "pid": self.pid}
            header = wire.pack_header(envelope)
        stream = _Stream(job, header)
        self._streams[job] = stream
        hello = {"heartbeat_seconds": self.heartbeat_seconds, "backlog": self.backlog}
        self._add(stream, wire.HELLO, hello)
        return stream

    def _add(self, stream: _Stream, kind: str, body: dict[str, Any]) -> None:
        """Number one item and queue or drop it (the caller holds the lock)."""
        seq = stream.produced
        stream.produced = seq + 1
        if stream.header is None or kind not in wire.KINDS or type(body) is not dict:
            stream.drop(wire.DROP_INVALID)
            return
        stream.ended = kind == wire.BYE
        if self._closing:
            stream.drop(wire.DROP_SHUTDOWN)
        elif self._queued >= self.backlog:
            stream.drop(wire.DROP_SPOOL_FULL if self._spool_full else wire.DROP_BACKLOG_FULL)
        else:
            stream.queue.append((kind, seq, time.time(), body))
            self._queued += 1

    def stats(self) -> dict[str, Any]:
        """Connection state and, per job, what was produced, sent, dropped and still waits."""
        with self._lock:
            jobs = {
                job: {
                    "produced": s.produced,
                    "sent": s.sent,
                    "dropped": dict(s.dropped),
                    "backlog": len(s.queue) + len(s.pending),
                    "spooled": s.spooled,
                }
                for job, s in self._streams.items()
            }
        return {
            "endpoint": self.endpoint,
            "agent": self.agent_id,
            "connected": self.connected,
            "reconnects": self.reconnects,
            "handshake_failures": self.handshake_failures,
            "internal_errors": self.internal_errors,
            "spool_full": self._spool_full,
            "jobs": jobs,
        }

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        """Start the sending thread (it makes its own ZeroMQ context and socket)."""
        if self._thread is not None:
            return
        thread = threading.Thread(target=self._run, name="outrider-uplink", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't create new thread at interpreter shutdown"
            logger.warning("uplink: cannot start its thread (%s); nothing will be forwarded", exc)
            return
        self._thread = thread

    def close(self, timeout: float = 2.0) -> None:
        """Send what waits, then a bye per job with its final counters, within ``timeout``
        seconds (plus at most ``linger_seconds`` for ZeroMQ to hand over the last bytes).
        What could not be sent is counted as dropped ``shutdown``."""
        if self._stopping:
            return
        self._deadline = time.monotonic() + max(0.0, timeout)
        self._stopping = True
        thread = self._thread
        if thread is None or not thread.is_alive():
            self._give_up()
            self._drop_byes()
            self._close_spools()
            return
        self._wake.set()
        thread.join(timeout + self.linger_seconds + 2.0)

    # -- the thread --------------------------------------------------------
    def _run(self) -> None:
        context = zmq.Context()
        try:
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(
                zmq.IMMEDIATE, 1
            )  # no peer, no queueing in ZeroMQ: our backlog holds it
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            sock.setsockopt(zmq.LINGER, int(self.linger_seconds * 1000))
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # backoff, doubling up to 2 s
            sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5000)
            sock.setsockopt(zmq.HEARTBEAT_TTL, 10_000)
            if self._keys is not None:
                pair, server_key = self._keys
                sock.curve_secretkey = pair.secret
                sock.curve_publickey = pair.public
                sock.curve_serverkey = server_key
            monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
            sock.connect(self.endpoint)
        except Exception as exc:
            logger.warning(
                "uplink: cannot connect to %s (%s); nothing is forwarded", self.endpoint, exc
            )
            self._stopping = True
            self._give_up()
            context.destroy(linger=0)
            return
        try:
            self._loop(sock, monitor)
            self._finish(sock, monitor)
        except Exception:
            self.internal_errors += 1
            logger.exception("uplink: the sending thread failed; what it held is dropped")
            self._give_up()
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=int(self.linger_seconds * 1000))
            context.term()
            self._close_spools()

    def _loop(self, sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
        while not self._stopping:
            self._wake.wait(self._idle_timeout())
            self._wake.clear()
            self._poll_monitor(monitor)
            if self._stopping:
                break
            if self.connected and 0 < self._queued < MAX_BATCH:
                self._wake.wait(FLUSH_SECONDS)  # let the batch fill; a full one cuts this short
                self._wake.clear()
            try:
                if self.connected:
                    self._beat()
                    self._send_all(sock)
                self._spill()
            except zmq.ZMQError:
                raise
            except Exception:  # one bad item must not stop the stream
                self.internal_errors += 1
                logger.debug("uplink: internal error", exc_info=True)
                self._complaints.warning(
                    "uplink-error", "uplink: internal error (debug log has it)"
                )

    def _idle_timeout(self) -> float:
        if not self.connected:
            return DISCONNECTED_POLL
        with self._lock:
            if any(s.unsent for s in self._streams.values()):
                return FLUSH_SECONDS
            beats = [s.last_beat for s in self._streams.values() if not s.ended]
        if not beats:
            return self.heartbeat_seconds
        due = min(beats) + self.heartbeat_seconds - time.monotonic()
        return min(max(due, 0.01), self.heartbeat_seconds)

    def _poll_monitor(self, monitor: zmq.Socket[bytes]) -> None:
        while monitor.poll(0):
            event = recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                if self._ever_connected:
                    self.reconnects += 1
                self._ever_connected = True
                self.connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False
            elif event & _HANDSHAKE_FAILED:
                self.handshake_failures += 1
                self._complaints.warning(
                    "handshake",
                    "uplink: the aggregator at %s refused the handshake (does this node hold "
                    "the job's node.key_secret and the aggregator's aggregator.key?)",
                    self.endpoint,
                )

    def _beat(self) -> None:
        now = time.monotonic()
        woke = False
        with self._lock:
            for stream in self._streams.values():
                if not stream.ended and now - stream.last_beat >= self.heartbeat_seconds:
                    stream.last_beat = now
                    self._add(stream, wire.HEARTBEAT, {})
                    woke = True
        if woke:
            self._wake.set()

    def _send_all(self, sock: zmq.Socket[bytes]) -> bool:
        """Send until every stream is empty or ZeroMQ says wait; True when all went."""
        while True:
            progress = False
            for stream in list(self._streams.values()):
                if not stream.pending:
                    stream.pending.extend(self._take(stream))
                if not stream.pending:
                    continue
                batch = _batch(stream.pending)
                assert stream.header is not None  # an invalid job never queues anything
                try:
                    sock.send(wire.join(stream.header, batch), zmq.NOBLOCK)
                except zmq.Again:  # no aggregator, or its high-water mark: try again later
                    return False
                for _ in batch:
                    stream.pending.popleft()
                with self._lock:
                    stream.sent += len(batch)
                progress = True
            if not progress:
                return True

    def _take(self, stream: _Stream) -> list[bytes]:
        """Packed items for the next message: the spool's first, then the memory backlog's."""
        if stream.spooled:
            return stream.spool.take(MAX_BATCH, BATCH_BYTES) if stream.spool else []
        with self._lock:
            count = min(len(stream.queue), MAX_BATCH)
            items = [stream.queue.popleft() for _ in range(count)]
            self._queued -= count
        return [frame for frame in map(self._pack_for(stream), items) if frame is not None]

    def _pack_for(self, stream: _Stream) -> Any:
        def pack(item: QueuedItem) -> bytes | None:
            return self._pack(stream, item)

        return pack

    def _pack(self, stream: _Stream, item: QueuedItem) -> bytes | None:
        """One item packed and checked as the aggregator will check it; None if dropped."""
        kind, seq, t, body = item
        if kind in wire.COUNTER_KINDS:
            with self._lock:
                body = {**body, "uplink": stream.counters()}
        reason = None
        try:
            frame = wire.pack_item(kind, seq, t, body)
        except Exception:
            reason = wire.DROP_UNENCODABLE
        else:
            if len(frame) > wire.MAX_ITEM_BYTES:
                reason = wire.DROP_TOO_LARGE
            else:
                try:
                    wire.check_item(msgpack.unpackb(frame, raw=False, strict_map_key=False))
                except wire.Rejected:
                    reason = wire.DROP_INVALID
        if reason is None:
            return frame
        with self._lock:
            stream.drop(reason)
        self._complaints.warning(
            f"drop-{reason}",
            "uplink: a %s item of job %s was dropped (%s)",
            kind,
            stream.job,
            reason,
        )
        return None

    def _spill(self) -> None:
        """Move memory backlogs to the spool once half full, oldest first, while it has room."""
        if self._spill_mark < 0 or self._queued < self._spill_mark or self._spool_broken:
            return
        assert self.spool_dir is not None
        for stream in list(self._streams.values()):
            with self._lock:
                items, stream.queue = stream.queue, collections.deque()
                self._queued -= len(items)
            rest = self._spill_stream(stream, items)
            if rest:
                with self._lock:
                    stream.queue.extendleft(reversed(rest))
                    self._queued += len(rest)

    def _spill_stream(
        self, stream: _Stream, items: collections.deque[QueuedItem]
    ) -> list[QueuedItem]:
        """Write ``items`` to the stream's spool; what did not fit comes back, in order."""
        assert self.spool_dir is not None
        room = self.spool_bytes - sum(s.spool.write_at for s in self._streams.values() if s.spool)
        frames: list[bytes] = []
        self._spool_full = False
        while items:
            frame = self._pack(stream, items[0])
            if frame is not None and len(frame) + _FRAME.size > room:
                self._spool_full = True
                break
            items.popleft()
            if frame is not None:
                frames.append(frame)
                room -= len(frame) + _FRAME.size
        if frames:
            try:
                if stream.spool is None:
                    self.spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                    stream.spool = Spool(self.spool_dir / f"{stream.job}.{self.agent_id}.spool")
                stream.spool.append(frames)
            except OSError as exc:
                self._spool_broken = self._spool_full = True
                logger.warning(
                    "uplink: cannot spool to %s (%s); the backlog is kept in memory only",
                    self.spool_dir,
                    exc,
                )
                with self._lock:
                    stream.drop(wire.DROP_SPOOL_FULL, len(frames))
        return list(items)

    def _finish(self, sock: zmq.Socket[bytes], monitor: zmq.Socket[bytes]) -> None:
        """Drain within the deadline, keeping a moment for the byes; count what is left."""
        remaining = self._deadline - time.monotonic()
        drain_until = self._deadline - min(0.5, 0.25 * max(remaining, 0.0))
        while time.monotonic() < drain_until and self._unsent():
            self._poll_monitor(monitor)
            if not (self.connected and self._send_all(sock)):
                self._wake.wait(0.01)
        self._give_up()
        while time.monotonic() < self._deadline and self._unsent():
            self._poll_monitor(monitor)
            if not (self.connected and self._send_all(sock)):
                self._wake.wait(0.01)
        self._drop_byes()

    def _drop_byes(self) -> None:
        """The byes that did not go count too (in ``stats()``; the aggregator never hears)."""
        with self._lock:
            for stream in self._streams.values():
                stream.drop(wire.DROP_SHUTDOWN, len(stream.pending))
                stream.pending.clear()

    def _unsent(self) -> bool:
        with self._lock:
            return any(s.unsent for s in self._streams.values())

    def _give_up(self) -> None:
        """Count everything unsent as dropped ``shutdown`` and queue each job's final bye."""
        with self._lock:
            self._closing = True
            for stream in self._streams.values():
                spooled = stream.spooled
                left = len(stream.queue) + len(stream.pending) + spooled
                stream.drop(wire.DROP_SHUTDOWN, left)
                self._queued -= len(stream.queue)
                stream.queue.clear()
                stream.pending.clear()
                if stream.spool is not None:
                    stream.spool.clear()
                if stream.header is None or (stream.ended and not left):
                    continue
                seq = stream.produced
                stream.produced = seq + 1
                stream.ended = True
                body = {"uplink": stream.counters()}
                stream.pending.append(wire.pack_item(wire.BYE, seq, time.time(), body))

    def _close_spools(self) -> None:
        for stream in self._streams.values():
            if stream.spool is not None:
                stream.spool.close()


def _batch(pending: Iterable[bytes]) -> list[bytes]:
    """The first frames of ``pending`` that make one message (at least one)."""
    batch: list[bytes] = []
    size = 0
    for frame in pending:
        if batch and (len(batch) >= MAX_BATCH or size + len(frame) > BATCH_BYTES):
            break
        batch.append(frame)
        size += len(frame)
    return batch
