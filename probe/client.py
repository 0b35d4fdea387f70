"""The probe's per-process state: the bounded queue the training thread feeds.

``submit`` is the whole training-thread cost of telemetry: take a sequence
number, check the bound, append, return. Everything else happens on the
sender thread (probe/sender.py).
"""

from __future__ import annotations

import atexit
import collections
import itertools
import os
import time
import weakref
from collections.abc import Callable
from typing import Any

from probe import internal, protocol
from probe.identity import Identity
from probe.sender import (
    DEFAULT_BUSY_FLUSH_INTERVAL,
    DEFAULT_FLUSH_INTERVAL,
    Counters,
    Record,
    Sender,
)

DEFAULT_QUEUE_SIZE = 10_000
DEFAULT_EXIT_TIMEOUT = 2.0
#: a longer window would hold heartbeats past their 5 s interval: a live trainer would look silent
MAX_FLUSH_INTERVAL = 5.0


class Client:
    """One stream to the agent: identity, sequence numbers, queue, sender thread."""

    def __init__(
        self,
        endpoint: str,
        identity: Identity,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        exit_timeout: float = DEFAULT_EXIT_TIMEOUT,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        busy_flush_interval: float = DEFAULT_BUSY_FLUSH_INTERVAL,
        **sender_options: Any,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        for name, seconds in (
            ("flush_interval", flush_interval),
            ("busy_flush_interval", busy_flush_interval),
        ):
            if not 0.0 <= seconds <= MAX_FLUSH_INTERVAL:  # NaN fails too
                raise ValueError(
                    f"{name} must be 0 to {MAX_FLUSH_INTERVAL:g} seconds, got {seconds}"
                )
        self.endpoint = endpoint
        self.identity = identity
        self.capacity = queue_size
        self.exit_timeout = exit_timeout
        self._sender_options = {
            **sender_options,
            "flush_interval": flush_interval,
            "busy_flush_interval": busy_flush_interval,
        }
        self._reset()
        atexit.register(_finish_at_exit, weakref.ref(self))
        os.register_at_fork(after_in_child=_forget_in_child(weakref.ref(self)))

    def _reset(self) -> None:
        self.queue: collections.deque[Record] = collections.deque()
        self.next_seq = itertools.count().__next__
        self.counters = Counters()
        self.finished = False
        self.sender = Sender(
            self.endpoint,
            self.identity,
            self.queue,
            self.next_seq,
            self.counters,
            **self._sender_options,
        )
        self.started = False
        self.submit = self._make_submit()

    # -- training thread ---------------------------------------------------
    def _make_submit(self) -> Callable[[str, int | None, Any], bool]:
        """The training thread's whole cost: number, bound check, append, return.

        A closure with everything it touches bound as locals, because attribute
        lookups are a measurable part of a 2 us budget.
        """
        queue = self.queue
        length = queue.__len__
        append = queue.append
        next_seq = self.next_seq
        capacity = self.capacity
        wake_at = self.sender.max_batch
        wake = self.sender.wake.set
        now = time.time
        client = self

        def submit(kind: str, step: int | None, body: Any) -> bool:
            """Queue one record; False (and a counted drop) when the queue is full."""
            seq = next_seq()
            depth = length()
            if depth >= capacity:
                client.counters.drop(protocol.DROP_QUEUE_FULL)
                return False
            append((kind, seq, now(), step, body))
            if not client.started:
                client.start()
            elif depth == 0 or depth + 1 == wake_at:  # a first record, or a full batch
                wake()
            return True

        return submit

    def drop(self, reason: str) -> None:
        """Count a record the training thread refused (it still uses a sequence number)."""
        self.next_seq()
        self.counters.drop(reason)

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> None:
        if self.started or self.finished:
            return
        self.started = True
        self.sender.start()

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued so far is sent or counted; True if it all went."""
        if not self.started or not self.sender.alive:
            return not self.queue
        return self.sender.wait_drained(timeout)

    def finish(self, timeout: float | None = None) -> bool:
        """Flush, say bye with exact counters, close the socket; bounded by ``timeout``."""
        if self.finished:
            return True
        timeout = self.exit_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.finished = True
        if not self.started:
            return True
        done = self.flush(timeout)
        self.sender.stop(max(0.0, deadline - time.monotonic()) + 0.5)
        if not done:
            internal.logger.warning(
                "outrider probe: exit flush timed out after %.1f s; %d records were not sent "
                "and are counted as dropped",
                timeout,
                len(self.queue),
            )
        return done

    def stats(self) -> dict[str, Any]:
        """The probe's own counters, as reported to the agent, and how long records gather
        before they are sent now (longer while every core is busy)."""
        stats = self.counters.snapshot(produced=-1, queued=len(self.queue))
        stats["flush_window"] = self.sender.window
        return stats


def _finish_at_exit(ref: weakref.ReferenceType[Client]) -> None:
    client = ref()
    if client is not None and client.identity.pid == os.getpid():
        try:
            client.finish()
        except Exception as exc:
            internal.record(exc, "atexit")


def _forget_in_child(ref: weakref.ReferenceType[Client]) -> Any:
    def after_fork() -> None:
        """A forked child gets a new stream and drops the parent's queued records.

        The parent's socket and thread do not exist in the child; the child's
        own sender starts only if the child logs something.
        """
        client = ref()
        if client is None:
            return
        internal.reset_after_fork()
        client.identity = client.identity.forked()
        client._reset()

    return after_fork
