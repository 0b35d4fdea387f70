"""The agent's socket: a ZeroMQ PULL drained in bursts, and a pipe that wakes it.

The receive loop sleeps in one poll on both: input on the socket, or a
wake-up from another thread (the analysis has output, a signal arrived).
Messages are drained in bursts, so the store is written once per burst and
stays at most one burst behind the socket.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

import zmq

from agent.ingest import endpoint as endpoints
from probe import protocol

BURST = 1000  # messages per receive burst before the store is flushed...
BURST_SECONDS = 0.02  # ...or this much time: the store stays close behind the socket
RECEIVE_HWM = 1000  # messages ZeroMQ queues for us before the senders' own queues fill


class Receiver:
    """Binds the endpoint; waits for input or a wake-up; yields one burst of raw messages."""

    def __init__(self, endpoint: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.endpoint = endpoint
        self.clock = clock
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        # Beyond twice our own limit ZeroMQ cuts the sender off before buffering it.
        self._socket.setsockopt(zmq.MAXMSGSIZE, 2 * protocol.MAX_MESSAGE_BYTES)
        self._ipc_path = endpoints.ipc_path(endpoint)
        if self._ipc_path is not None:
            endpoints.claim_ipc_path(self._ipc_path, endpoint)
        self._socket.bind(endpoint)
        if self._ipc_path is not None:
            os.chmod(self._ipc_path, 0o600)
        # Other threads wake the receive loop through this pipe, so it can sleep until
        # its next beat instead of polling.
        self._wake_read, self.wake_fd = os.pipe()
        os.set_blocking(self._wake_read, False)
        os.set_blocking(self.wake_fd, False)
        self._poller = zmq.Poller()
        self._poller.register(self._socket, zmq.POLLIN)
        self._poller.register(self._wake_read, zmq.POLLIN)

    def wait(self, timeout_ms: int) -> bool:
        """Sleep up to ``timeout_ms`` for input or a wake-up; True when input waits."""
        ready = dict(self._poller.poll(timeout_ms))
        if self._wake_read in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_read, 4096)
        return self._socket in ready

    def burst(self) -> Iterator[bytes]:
        """Up to BURST waiting messages, or BURST_SECONDS' worth, without blocking."""
        recv = self._socket.recv
        deadline = self.clock() + BURST_SECONDS
        count = 0
        while count < BURST and (count % 64 or self.clock() < deadline):
            try:
                raw = recv(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            count += 1
            yield raw

    def wake(self) -> None:
        """Wake the receive loop from another thread (safe from any thread)."""
        # Full: a wake-up is already pending. Closed: the agent is gone.
        with contextlib.suppress(OSError):
            os.write(self.wake_fd, b"\0")

    def close_socket(self) -> None:
        """Stop listening: close the socket, remove its IPC file."""
        self._socket.close(linger=0)
        self._context.term()
        if self._ipc_path is not None:
            self._ipc_path.unlink(missing_ok=True)

    def close_wake_pipe(self) -> None:
        """Last: a signal handler may still write to the pipe until its fd is released."""
        if self._wake_read < 0:
            return
        self._poller.unregister(self._wake_read)
        os.close(self._wake_read)
        os.close(self.wake_fd)
        self._wake_read = self.wake_fd = -1  # a late wake() writes to no fd, not a reused one
