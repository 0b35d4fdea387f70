"""The aggregator's socket: a PULL bound on TCP, CURVE server, nodes' keys checked.

Only nodes holding a key the aggregator trusts (a ``*.key`` file in its keys
directory) get through the CURVE handshake. A node with the wrong keys
sends nothing that reaches the aggregator: the refusal is counted (a socket
monitor's failed-handshake events) and logged, rate-limited, naming the
peer's address when the authenticator saw it.

One thread calls ``wait`` and ``burst`` (ZeroMQ sockets are not thread-safe);
``counters`` may be called from any thread.
"""

from __future__ import annotations

import collections
import logging
import threading
from pathlib import Path
from typing import Any

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from agent.aggregation import wire
from agent.aggregation.endpoint import use_curve
from agent.aggregation.keys import aggregator_keys
from sinks.ratelimit import RateLimitedLog

logger = logging.getLogger("outrider.agent.listener")

#: messages the socket holds for us before nodes' sends wait (in their own backlogs)
RECEIVE_HWM = 1000
_FAILED: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "refused by key",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "protocol error (wrong aggregator.key or no CURVE)",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
}
_EVENTS = (
    zmq.EVENT_ACCEPTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)


class _Authenticator(ThreadAuthenticator):
    """The ZAP handler, remembering which peer address each refused key came from."""

    def __init__(self, context: zmq.Context[Any], allowed: set[bytes]) -> None:
        super().__init__(context, log=logging.getLogger("outrider.agent.zap"))
        self.allowed = allowed
        self.refused: collections.deque[tuple[str, str]] = collections.deque(maxlen=64)
        self._peer = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._peer = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
        await super().handle_zap_message(msg)

    def callback(self, domain: str, key: bytes) -> bool:
        """The credentials provider's check (``configure_curve_callback``)."""
        if key in self.allowed:
            return True
        self.refused.append((self._peer or "an unknown address", key.decode("ascii", "replace")))
        return False


class Listener:
    """Receives uplink messages from the nodes; see the module docstring."""

    def __init__(self, bind: str, *, keys_dir: Path | None, insecure: bool = False) -> None:
        self.curve = use_curve(bind, keys_dir, insecure, "aggregator")
        self.keys_dir = keys_dir
        pair = None
        allowed: set[bytes] = set()
        if self.curve and keys_dir is not None:
            pair, authorized = aggregator_keys(keys_dir)
            allowed = set(authorized)
        self._lock = threading.Lock()
        self._counts = {
            "handshake_failures": 0,
            "handshakes": 0,
            "connections": 0,
            "disconnects": 0,
        }
        self._complaints = RateLimitedLog(log=logger)
        self.context: zmq.Context[Any] = zmq.Context()
        self._auth: _Authenticator | None = None
        try:
            if pair is not None:
                self._auth = _Authenticator(self.context, allowed)
                self._auth.start()
                self._auth.configure_curve_callback("*", self._auth)
            self.socket = self.context.socket(zmq.PULL)
            self.socket.setsockopt(zmq.LINGER, 0)
            self.socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
            # A peer sending more than any uplink message may is cut off, not buffered.
            self.socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
            if pair is not None:
                self.socket.curve_secretkey = pair.secret
                self.socket.curve_publickey = pair.public
                self.socket.curve_server = True
            self._monitor = self.socket.get_monitor_socket(_EVENTS)
            self.socket.bind(bind)
        except Exception:
            self._teardown()
            raise
        self.endpoint: str = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if pair is not None:
            logger.info(
                "aggregator listening on %s (CURVE, %d node key(s) from %s)",
                self.endpoint,
                len(allowed),
                keys_dir,
            )

    def wait(self, timeout_ms: int) -> bool:
        """Whether a message is waiting, after at most ``timeout_ms``."""
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def burst(self, max_messages: int = 1000) -> list[bytes]:
        """Every message waiting, up to ``max_messages``, without blocking."""
        messages: list[bytes] = []
        recv = self.socket.recv
        try:
            while len(messages) < max_messages:
                messages.append(recv(zmq.NOBLOCK))
        except zmq.Again:
            pass
        self._read_monitor()
        return messages

    def counters(self) -> dict[str, int]:
        """``handshake_failures``, ``handshakes``, ``connections`` and ``disconnects`` so far."""
        self._read_monitor()
        with self._lock:
            return dict(self._counts)

    def _read_monitor(self) -> None:
        with self._lock:
            while self._monitor.poll(0):
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_ACCEPTED:
                    self._counts["connections"] += 1
                elif event == zmq.EVENT_DISCONNECTED:
                    self._counts["disconnects"] += 1
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._counts["handshakes"] += 1
                elif event in _FAILED:
                    self._counts["handshake_failures"] += 1
                    self._complain(_FAILED[event])

    def _complain(self, what: str) -> None:
        peer, key = "", ""
        if self._auth is not None and self._auth.refused:
            peer, key = self._auth.refused.popleft()
        if key:
            self._complaints.warning(
                "handshake",
                "aggregator: refused a node at %s: its key %s is not a *.key file in %s",
                peer,
                key,
                self.keys_dir,
            )
        else:
            self._complaints.warning(
                "handshake",
                "aggregator: a node's handshake on %s %s (does it hold this job's keys?)",
                self.endpoint,
                what,
            )

    def close(self) -> None:
        self._teardown()

    def _teardown(self) -> None:
        socket = getattr(self, "socket", None)
        monitor = getattr(self, "_monitor", None)
        if socket is not None and monitor is not None:
            socket.disable_monitor()
        if monitor is not None:
            monitor.close(linger=0)
        if socket is not None:
            socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.context.term()
