"""Webhook delivery for fired alerts, on a daemon thread per destination.

The alert engine runs on the agent's analysis thread, which must never wait on
the network. ``WebhookSender.submit`` serialises the alert and appends it to a
bounded queue (the oldest payload is dropped and counted when it is full); a
daemon thread posts it with ``urllib.request``. A slow, failing or unreachable
endpoint costs only that thread's time, failures are counted and logged at most
once per ``log_interval`` seconds, and ``close(timeout)`` returns within its
timeout whatever the endpoint does.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, Literal

from sinks import schema
from sinks.ratelimit import RateLimitedLog

WebhookFormat = Literal["json", "slack"]
USER_AGENT = "outrider-alerts/0.1"
RESPONSE_LIMIT = 64 * 1024  # bytes read (and ignored) from a webhook's answer


def validate_url(url: str) -> str:
    """``url`` if it is an absolute http(s) URL with a host; ValueError saying why not."""
    if any(ch.isspace() for ch in url):
        raise ValueError(f"webhook url {url!r} contains whitespace")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"webhook url {url!r}: scheme {parts.scheme or '(none)'!r} is not allowed; "
            "use http:// or https://"
        )
    if not parts.hostname:
        raise ValueError(f"webhook url {url!r} has no host")
    try:
        parts.port  # noqa: B018 -- evaluated for its ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"webhook url {url!r}: {exc}") from None
    return url


def describe_url(url: str) -> str:
    """Scheme and host only: webhook paths and queries often hold secrets (Slack tokens)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def json_safe(value: Any) -> Any:
    """A copy JSON can encode: NaN/inf as the protocol's strings, unknown types as str."""
    if isinstance(value, float):
        return schema.encode_number(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, Mapping):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return str(value)


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def render_payload(alert: Mapping[str, Any], format: WebhookFormat) -> bytes:
    """The request body: the alert dict (``json``) or ``{"text": ...}`` (``slack``).

    Slack's text puts the alert's ``advice``, when it has one, on a line of its own.
    """
    if format == "slack":
        severity = str(alert.get("severity", "")).upper()
        text = f"[{severity}] {alert.get('name')}: {alert.get('message')}"
        advice = alert.get("advice")
        if isinstance(advice, str) and advice:
            text += f"\nWhat to do: {advice}"
        body: Any = {"text": _slack_escape(text)}
    else:
        body = json_safe(alert)
    return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()


class WebhookSender:
    """Posts alerts to one URL from its own daemon thread; ``submit`` never blocks."""

    def __init__(
        self,
        name: str,
        url: str,
        *,
        format: WebhookFormat = "json",
        timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        queue_size: int = 100,
        log_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self.name = name
        self.url = validate_url(url)
        self.format: WebhookFormat = format
        self.timeout = timeout
        self.headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            **dict(headers or {}),
        }
        self._complaints = RateLimitedLog(log_interval, clock, logging.getLogger("outrider.alerts"))
        self._queue: collections.deque[bytes] = collections.deque()
        self._queue_size = queue_size
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._close_deadline = math.inf
        self._in_flight = 0
        self._counts = {"sent": 0, "failed": 0, "dropped_queue_full": 0, "dropped_closed": 0}

    # -- the caller's side ----------------------------------------------------------------
    def submit(self, alert: Mapping[str, Any]) -> bool:
        """Queue ``alert`` for delivery; False when it was refused (sender closed)."""
        payload = render_payload(alert, self.format)
        with self._cond:
            if self._closing:
                self._counts["dropped_closed"] += 1
                return False
            if len(self._queue) >= self._queue_size:
                self._queue.popleft()
                self._counts["dropped_queue_full"] += 1
            self._queue.append(payload)
            if not self._ensure_thread():
                self._counts["dropped_closed"] += len(self._queue)
                self._queue.clear()
                return False
            self._cond.notify()
        return True

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s until nothing is queued or in flight; True if so."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Deliver what is queued within ``timeout`` s, then stop; True if the thread ended.

        Payloads still queued at the deadline are counted as ``dropped_closed``. A
        request in flight past the deadline is abandoned with its daemon thread.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            self._closing = True
            self._close_deadline = deadline
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._counts["dropped_closed"] += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        return thread is None or not thread.is_alive()

    def stats(self) -> dict[str, int]:
        """Counters: sent, failed, dropped_queue_full, dropped_closed, queued."""
        with self._cond:
            return {**self._counts, "queued": len(self._queue)}

    # -- the sender thread -----------------------------------------------------------------
    def _ensure_thread(self) -> bool:
        if self._thread is not None:
            return True
        thread = threading.Thread(
            target=self._run, name=f"outrider-webhook-{self.name}", daemon=True
        )
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down: no new threads
            return False
        self._thread = thread
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue or (self._closing and time.monotonic() >= self._close_deadline):
                    return
                payload = self._queue.popleft()
                self._in_flight += 1
            error = self._post(payload)
            with self._cond:
                self._in_flight -= 1
                self._counts["failed" if error else "sent"] += 1
                self._cond.notify_all()
            if error:
                self._complain(error)

    def _post(self, payload: bytes) -> str | None:
        """None on a 2xx answer, else what went wrong (never raises)."""
        request = urllib.request.Request(
            self.url, data=payload, headers=self.headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                response.read(RESPONSE_LIMIT)
            return None
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} {exc.reason}"
        except urllib.error.URLError as exc:
            return f"{type(exc.reason).__name__}: {exc.reason}"
        except Exception as exc:  # timeouts, resets, bad answers: a webhook must not kill us
            return f"{type(exc).__name__}: {exc}"

    def _complain(self, error: str) -> None:
        self._complaints.warning(
            "webhook",
            "outrider alerts: webhook %r (%s) failed: %s; %d failed so far",
            self.name,
            describe_url(self.url),
            error,
            self._counts["failed"],
        )
