"""The sender thread: batch, pack and push records to the agent, never blocking.

It owns the ZeroMQ socket (PUSH, NOBLOCK, IMMEDIATE, a high-water mark and a
small LINGER), so the training thread never touches a socket. Whatever it
cannot deliver it counts by reason; the counts go to the agent in
``probe_stats`` records and, exactly, in the final ``bye``.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import msgpack
import zmq

from probe import internal, protocol, values
from probe.blocks import to_blocks
from probe.cores import CoreLoad
from probe.identity import Identity, trainer_environment

logger = logging.getLogger("outrider.probe")

Record = tuple[str, int, float, "int | None", Any]

#: how long the sender lets a step's records gather before sending them as one message:
#: short enough for the 50 ms latency budget, long enough for one step's records
DEFAULT_FLUSH_INTERVAL = 0.02
#: ... and while every core the trainer may run on is busy (probe/cores.py): a few steps
#: of a short-stepped trainer go as one message, so the threads of both sides wake less
DEFAULT_BUSY_FLUSH_INTERVAL = 0.25
LOAD_INTERVAL = 1.0  # seconds between two readings of the cores' load
IDLE_INTERVAL = 1.0  # the longest the sender sleeps with nothing queued (probe stats, heartbeats)
#: seconds after start during which records wait in the queue for a slow-starting agent
CONNECT_GRACE = 2.0


class Counters:
    """What the probe did with the records it was handed (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent = 0
        self.batches = 0
        self.invalid_values = 0
        self.dropped: dict[str, int] = {}

    def drop(self, reason: str, count: int = 1) -> None:
        with self.lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + count

    def snapshot(self, produced: int, queued: int) -> dict[str, Any]:
        with self.lock:
            return {
                "produced": produced,
                "sent": self.sent,
                "batches": self.batches,
                "dropped": dict(self.dropped),
                "invalid_values": self.invalid_values,
                "internal_errors": internal.error_count(),
                "queue_depth": queued,
            }


class Sender:
    """Drains the probe's queue on its own thread and pushes batches to the agent."""

    def __init__(
        self,
        endpoint: str,
        identity: Identity,
        queue: collections.deque[Record],
        seq: Callable[[], int],
        counters: Counters,
        *,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        busy_flush_interval: float = DEFAULT_BUSY_FLUSH_INTERVAL,
        max_batch: int = 512,
        connect_grace: float = CONNECT_GRACE,
        heartbeat_interval: float = 5.0,
        stats_interval: float = 1.0,
        high_water_mark: int = 1000,
        linger_ms: int = 500,
    ) -> None:
        self.endpoint = endpoint
        self.identity = identity
        self.queue = queue
        self.next_seq = seq
        self.counters = counters
        self.flush_interval = flush_interval
        # Never shorter than the quiet window: 0 (or anything under it) turns adapting off.
        self.busy_flush_interval = max(flush_interval, busy_flush_interval)
        self.core_load = CoreLoad()
        self.max_batch = min(max_batch, protocol.MAX_RECORDS_PER_MESSAGE - 2)
        self.connect_grace = connect_grace
        self.heartbeat_interval = heartbeat_interval
        self.stats_interval = stats_interval
        self.high_water_mark = high_water_mark
        self.linger_ms = linger_ms

        self.wake = threading.Event()
        self.drained = threading.Condition()
        self.drain_count = 0  # completed drains that left the queue empty
        self._stop = False
        self._thread: threading.Thread | None = None
        self._envelope = identity.envelope()
        self._environment = trainer_environment()
        self._packer = msgpack.Packer(use_bin_type=True)
        self.connected = False
        self._ever_connected = False
        self._warned_no_agent = False
        self._started_at = 0.0
        self._last_heartbeat = 0.0
        self._last_stats = 0.0
        self._last_load = 0.0
        self._last_stats_key: tuple[Any, ...] = ()
        self._recv_monitor_message: Callable[..., Any]  # set by start()

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> bool:
        """Start the thread; False if Python refuses (e.g. at interpreter shutdown)."""
        thread = threading.Thread(target=self._run, name="outrider-probe-sender", daemon=True)
        try:
            # pyzmq's monitor module imports asyncio (about 40 ms): taken here, not at `import
            # probe`, and on the caller's thread: an import on the sender's thread while the
            # trainer forks (DataLoader workers) would leave the child a lock it never gets.
            from zmq.utils.monitor import recv_monitor_message

            self._recv_monitor_message = recv_monitor_message
            thread.start()
        except (ImportError, RuntimeError) as exc:  # at interpreter shutdown
            internal.warn_once(
                "thread-start", "outrider probe: cannot start the sender thread (%s)", exc
            )
            return False
        self._thread = thread
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait_drained(self, timeout: float) -> bool:
        """Block the *caller* until the queue, as it is now, has been sent or dropped.

        Two completed drains after the call: the second one started after we
        asked, so it saw everything queued before.
        """
        deadline = time.monotonic() + timeout
        with self.drained:
            target = self.drain_count + 2
            while self.drain_count < target:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.alive:
                    return False
                self.wake.set()
                self.drained.wait(min(remaining, 0.05))
        return True

    def stop(self, timeout: float) -> None:
        """Ask the thread to send what it has, say bye and close; wait at most ``timeout``."""
        self._stop = True
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the thread --------------------------------------------------------
    def _run(self) -> None:
        try:
            context = zmq.Context()
            sock = context.socket(zmq.PUSH)
            sock.setsockopt(zmq.SNDHWM, self.high_water_mark)
            sock.setsockopt(zmq.LINGER, self.linger_ms)
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.RECONNECT_IVL, 100)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
            monitor = sock.get_monitor_socket(
                zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
            )
            sock.connect(self.endpoint)
        except Exception as exc:
            internal.warn_once(
                "connect",
                "outrider probe: cannot connect to the agent at %s (%s); telemetry is off, "
                "the trainer is unaffected",
                self.endpoint,
                exc,
            )
            self._drain_as_dropped(protocol.DROP_NO_AGENT)
            return
        try:
            self._started_at = time.monotonic()
            self._loop(sock, monitor)
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close()
            context.term()

    def _loop(self, sock: zmq.Socket[Any], monitor: zmq.Socket[Any]) -> None:
        # Every wake-up costs CPU the trainer could use, so the sender never polls: with
        # nothing queued it sleeps until the training thread queues a record (the client
        # wakes it) or a control record is due; then it gives the batch flush_interval to
        # fill (a full batch wakes it sooner) and sends it as one message.
        while True:
            if not self.queue and not self._stop:
                self.wake.wait(IDLE_INTERVAL)
                self.wake.clear()
            if self.queue and not self._stop:
                self.wake.wait(self.window)
                self.wake.clear()
            self._poll_monitor(monitor)
            stopping = self._stop
            if not self.connected:
                in_grace = time.monotonic() - self._started_at < self.connect_grace
                if in_grace and not stopping:
                    continue  # give the agent its start-up moment; the queue buffers
                self._warn_no_agent()  # also when the trainer ends within the grace
            try:
                # Heartbeat and stats records go in the same message as the queued
                # records: one wake-up of the agent, not two.
                self._maybe_control()
                self._send_pending(sock)
            except Exception as exc:
                internal.record(exc, "sender")
            if stopping:
                break
        self._finish(sock)

    def _finish(self, sock: zmq.Socket[Any]) -> None:
        """Final flush: what is still queued is sent once more, then bye with exact counts."""
        self._send_pending(sock)
        self._drain_as_dropped(protocol.DROP_SHUTDOWN)
        seq = self.next_seq()
        body = self.counters.snapshot(produced=seq + 1, queued=0)
        self._send_batch(sock, [(protocol.BYE, seq, time.time(), None, body)])

    def _poll_monitor(self, monitor: zmq.Socket[Any]) -> None:
        while monitor.poll(0):
            event = self._recv_monitor_message(monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected = True
                # Every (re)connection gets the run metadata: the agent may be a new one.
                self._emit_control(protocol.HELLO, hello_body(self._environment))
                if self._warned_no_agent:
                    self._warned_no_agent = False
                    logger.warning("outrider probe: agent at %s reached", self.endpoint)
                self._ever_connected = True
            elif event == zmq.EVENT_DISCONNECTED:
                self.connected = False

    def _warn_no_agent(self) -> None:
        if not self._warned_no_agent:
            self._warned_no_agent = True
            what = "lost" if self._ever_connected else "no agent listening"
            logger.warning(
                "outrider probe: %s at %s; telemetry is dropped and counted until it "
                "comes back. The trainer is unaffected.",
                what,
                self.endpoint,
            )

    @property
    def window(self) -> float:
        """How long records gather now: longer while every core is busy."""
        return self.busy_flush_interval if self.core_load.busy else self.flush_interval

    def _maybe_control(self) -> None:
        now = time.monotonic()
        adapts = self.busy_flush_interval > self.flush_interval
        if adapts and now - self._last_load >= LOAD_INTERVAL:
            self._last_load = now
            self.core_load.update()
        if now - self._last_heartbeat >= self.heartbeat_interval:
            self._last_heartbeat = now
            self._emit_control(protocol.HEARTBEAT, {})
        if now - self._last_stats >= self.stats_interval:
            self._last_stats = now
            snapshot = self.counters.snapshot(produced=0, queued=len(self.queue))
            key = (snapshot["sent"], tuple(sorted(snapshot["dropped"].items())))
            if key != self._last_stats_key:
                self._last_stats_key = key
                seq = self.next_seq()
                snapshot["produced"] = seq
                self.queue.appendleft((protocol.PROBE_STATS, seq, time.time(), None, snapshot))

    def _emit_control(self, kind: str, body: dict[str, Any]) -> None:
        """Control records jump the queue and are never dropped for a full queue."""
        self.queue.appendleft((kind, self.next_seq(), time.time(), None, body))

    def _send_pending(self, sock: zmq.Socket[Any]) -> None:
        """Send until the queue is empty."""
        queue = self.queue
        while queue:
            batch: list[Record] = []
            try:
                while len(batch) < self.max_batch:
                    batch.append(queue.popleft())
            except IndexError:
                pass
            self._send_batch(sock, batch)
        self._mark_drained()

    def _send_batch(self, sock: zmq.Socket[Any], batch: list[Record]) -> None:
        wire = []
        for record in batch:
            encoded = self._encode(record)
            if encoded is not None:
                wire.append(encoded)
        if not wire:
            return
        if not self.connected:
            self.counters.drop(protocol.DROP_NO_AGENT, len(wire))
            return
        try:
            message = self._packer.pack([protocol.VERSION, self._envelope, to_blocks(wire)])
        except Exception as exc:
            internal.record(exc, "pack")
            self.counters.drop(protocol.DROP_UNENCODABLE, len(wire))
            return
        if len(message) > protocol.MAX_MESSAGE_BYTES:
            self.counters.drop(protocol.DROP_TOO_LARGE, len(wire))
            return
        try:
            # Always a copy: pyzmq's zero-copy sends hand each buffer back through its garbage
            # thread (one more wake-up), which is stopped by its exit handler before the
            # probe's exit flush runs; a zero-copy send then fails and its records are lost.
            sock.send(message, zmq.NOBLOCK, copy=True)
        except zmq.Again:
            self.counters.drop(
                protocol.DROP_BACKPRESSURE if self.connected else protocol.DROP_NO_AGENT,
                len(wire),
            )
            return
        with self.counters.lock:
            self.counters.sent += len(wire)
            self.counters.batches += 1

    def _encode(self, record: Record) -> list[Any] | None:
        """The wire form of one record; None (and a counted drop) when it cannot go."""
        kind, seq, t, step, body = record
        try:
            if kind == protocol.SCALARS:
                body = self._encode_scalars(body)
            elif kind == protocol.TENSOR:
                payload = values.tensor_payload(body.pop("value"))
                if payload is None:
                    self.counters.drop(protocol.DROP_TOO_LARGE)
                    internal.warn_once(
                        f"too-large:{body.get('name')}",
                        "outrider probe: tensor %r is over %d bytes and was dropped",
                        body.get("name"),
                        protocol.MAX_TENSOR_BYTES,
                    )
                    return None
                body.update(payload)
        except Exception as exc:
            internal.record(exc, f"encode {kind}")
            self.counters.drop(protocol.DROP_UNENCODABLE)
            return None
        return [kind, seq, t, step, body]

    def _encode_scalars(self, metrics: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in metrics.items():
            if type(value) is values.CapturedVector:
                out.update(value.items())
                continue
            number = values.scalar_value(value)
            if number is None or type(name) is not str:
                with self.counters.lock:
                    self.counters.invalid_values += 1
                internal.warn_once(
                    f"invalid:{name!r}",
                    "outrider probe: metric %r has a %s value; probe.log takes numbers and "
                    "single-element tensors, so this value is skipped",
                    name,
                    type(value).__name__,
                )
                continue
            out[name] = number
        loss = out.get("loss")
        if loss is not None:
            # The flag the alert rules and dashboards use: 1 when the loss is NaN or inf.
            out["loss_nonfinite"] = 0 if math.isfinite(loss) else 1
        return out

    def _drain_as_dropped(self, reason: str) -> None:
        count = 0
        while True:
            try:
                self.queue.popleft()
            except IndexError:
                break
            count += 1
        if count:
            self.counters.drop(reason, count)
        self._mark_drained()

    def _mark_drained(self) -> None:
        with self.drained:
            self.drain_count += 1
            self.drained.notify_all()


def hello_body(environment: dict[str, str] | None = None) -> dict[str, Any]:
    """Run metadata only the trainer's process knows; ``environment`` is read once, at init."""
    torch = sys.modules.get("torch")
    return {
        "argv": list(sys.argv),
        "cwd": os.getcwd(),
        "executable": sys.executable,
        "python": platform.python_version(),
        "torch": getattr(torch, "__version__", None),
        "probe_version": protocol.VERSION,
        "environment": environment if environment is not None else trainer_environment(),
    }
