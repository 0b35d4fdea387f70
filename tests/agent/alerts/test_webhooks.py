"""Webhook delivery against a real local HTTP server: payloads, failures, bounded close."""

from __future__ import annotations

import json
import logging
import math
import queue
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from agent.alerts import webhooks as notify
from agent.alerts.engine import BUILTIN_RULES, AlertEngine, AlertsConfig
from agent.alerts.webhooks import WebhookSender, describe_url, json_safe, validate_url

RUN = "run-1"


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Server:
    """ThreadingHTTPServer on 127.0.0.1:0 that answers 200, 500, or hangs until released."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: queue.Queue[Received] = queue.Queue()
        self.arrived = threading.Event()
        self.release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                server.requests.put(Received(self.path, dict(self.headers.items()), body))
                server.arrived.set()
                if server.mode == "hang":
                    server.release.wait(30)
                    return
                self.send_response(500 if server.mode == "500" else 200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/hooks/secret-token"

    def next(self, timeout: float = 10.0) -> Received:
        return self.requests.get(timeout=timeout)

    def stop(self) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[Server]:
    srv = Server()
    yield srv
    srv.stop()


@pytest.fixture
def hanging() -> Iterator[Server]:
    srv = Server("hang")
    yield srv
    srv.stop()


def engine_for(
    url: str, to: tuple[str, ...] = ("hook", "store"), **destination: Any
) -> AlertEngine:
    """Only the nonfinite rule (cooldown 0), delivering to one webhook called `hook` (and `to`)."""
    rules: dict[str, Any] = {name: {"enabled": False} for name in BUILTIN_RULES}
    rules["nonfinite"] = {"cooldown": 0.0, "destinations": list(to)}
    config = AlertsConfig.model_validate(
        {
            "destinations": {"hook": {"type": "webhook", "url": url, **destination}},
            "rules": rules,
        }
    )
    return AlertEngine(config, strict=True)


def fire(engine: AlertEngine, count: int = 1) -> list[dict[str, Any]]:
    """``count`` nonfinite alerts (NaN, then finite to end the episode)."""
    fired: list[dict[str, Any]] = []
    for step in range(count):
        engine.observe(RUN, 0, 2 * step, 1.0, {"loss": math.nan})
        engine.observe(RUN, 0, 2 * step + 1, 1.0, {"loss": 1.0})
        fired.extend(engine.take_fired())
    return fired


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- payloads --------------------------------------------------------------------------------------
def test_json_payload_is_the_alert(server: Server) -> None:
    """format json posts the alert dict as JSON (NaN as "NaN") with the configured headers."""
    engine = engine_for(server.url, headers={"Authorization": "Bearer t0k"})
    (alert,) = fire(engine)
    got = server.next()
    assert got.path == "/hooks/secret-token"
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["Authorization"] == "Bearer t0k"
    body = json.loads(got.body)
    assert body == {**alert, "attrs": {**alert["attrs"], "value": "NaN", "threshold": None}}
    assert engine.flush(5.0)
    assert engine.stats()["webhooks"]["hook"]["sent"] == 1
    engine.close(1.0)


def test_slack_payload_is_a_text_message(server: Server) -> None:
    """format slack posts {"text": ...}, Slack's incoming-webhook shape, escaped."""
    engine = engine_for(server.url, format="slack")
    fire(engine)
    got = server.next()
    assert got.headers["Content-Type"] == "application/json"
    body = json.loads(got.body)
    assert set(body) == {"text"}
    assert body["text"].startswith("[CRITICAL] nonfinite: non-finite loss or gradients: loss=nan")
    assert f"run {RUN}, rank 0, step 0" in body["text"]
    payload = notify.render_payload({"name": "x", "message": "a<b & c>d"}, "slack")
    assert "a&lt;b &amp; c&gt;d" in json.loads(payload)["text"]
    engine.close(1.0)


# -- failures never block the engine ---------------------------------------------------------------
def test_hanging_server_does_not_block_the_engine(hanging: Server) -> None:
    """A server that never answers: observe/take_fired return at once; failures are counted."""
    engine = engine_for(hanging.url, timeout_seconds=0.5, queue_size=3)
    started = time.monotonic()
    fired = fire(engine, 10)
    elapsed = time.monotonic() - started
    assert len(fired) == 10
    assert elapsed < 0.5, f"10 alerts took {elapsed:.2f} s with a hanging webhook"
    assert hanging.arrived.wait(10)
    assert engine.flush(15.0)  # every request in flight or queued times out after 0.5 s
    stats = engine.stats()["webhooks"]["hook"]
    assert stats["sent"] == 0
    assert stats["failed"] + stats["dropped_queue_full"] == 10
    assert stats["dropped_queue_full"] >= 10 - 3 - 1
    assert engine.close(2.0)


def test_server_error_is_counted_and_logged_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    """HTTP 500 answers count as failures; one log line per interval, without the URL's secret."""
    srv = Server("500")
    try:
        engine = engine_for(srv.url)
        with caplog.at_level(logging.WARNING, logger="outrider.alerts"):
            fire(engine, 3)
            assert engine.flush(10.0)
        assert engine.stats()["webhooks"]["hook"]["failed"] == 3
        lines = [r.getMessage() for r in caplog.records if "webhook" in r.getMessage()]
        assert len(lines) == 1 and "HTTP 500" in lines[0]
        assert "secret-token" not in lines[0] and "127.0.0.1" in lines[0]
        engine.close(1.0)
    finally:
        srv.stop()


def test_closed_port_is_a_counted_failure() -> None:
    """Nothing listening: connection refused, counted; the engine carries on."""
    engine = engine_for(f"http://127.0.0.1:{free_port()}/hook", timeout_seconds=2)
    fire(engine, 2)
    assert engine.flush(10.0)
    stats = engine.stats()["webhooks"]["hook"]
    assert stats["failed"] == 2 and stats["sent"] == 0
    assert engine.close(1.0)


def test_close_is_bounded_with_a_request_in_flight(hanging: Server) -> None:
    """close(timeout) returns near its timeout while a request hangs; what is queued is dropped."""
    engine = engine_for(hanging.url, timeout_seconds=60)
    fire(engine, 3)
    assert hanging.arrived.wait(10)
    started = time.monotonic()
    finished = engine.close(0.3)
    elapsed = time.monotonic() - started
    assert not finished
    assert elapsed < 2.0, f"close(0.3) took {elapsed:.2f} s"
    stats = engine.stats()["webhooks"]["hook"]
    assert stats["dropped_closed"] == 2 and stats["queued"] == 0
    fire(engine)  # after close: refused and counted, never blocking
    assert engine.stats()["webhooks"]["hook"]["dropped_closed"] == 3


# -- the sender on its own -------------------------------------------------------------------------
def test_sender_thread_start_failure_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """At interpreter shutdown Thread.start raises: submit returns False and counts the drop."""

    class NoThreads(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't create new thread at interpreter shutdown")

    sender = WebhookSender("hook", "http://127.0.0.1:9/x")
    monkeypatch.setattr(threading, "Thread", NoThreads)
    assert sender.submit({"name": "x"}) is False
    assert sender.stats()["dropped_closed"] == 1
    assert sender.close(0.1)


def test_sender_delivers_in_order_and_flushes(server: Server) -> None:
    """Queued alerts arrive in order; flush returns once all are answered."""
    sender = WebhookSender("hook", server.url, queue_size=10)
    for index in range(5):
        assert sender.submit({"name": f"a{index}", "value": math.inf})
    assert sender.flush(10.0)
    bodies = [json.loads(server.next().body) for _ in range(5)]
    assert [b["name"] for b in bodies] == [f"a{i}" for i in range(5)]
    assert bodies[0]["value"] == "Infinity"
    assert sender.stats() == {
        "sent": 5,
        "failed": 0,
        "dropped_queue_full": 0,
        "dropped_closed": 0,
        "queued": 0,
    }
    assert sender.close(1.0)


@pytest.mark.parametrize(
    "url", ["ftp://h/x", "file:///etc/passwd", "http://", "//h/x", "http://h:99999/", "http://a b/"]
)
def test_validate_url_rejects(url: str) -> None:
    """Only absolute http(s) URLs with a host and a valid port pass."""
    with pytest.raises(ValueError, match="url"):
        validate_url(url)


def test_url_helpers() -> None:
    """Good URLs pass unchanged; logs show scheme and host only; JSON gets protocol strings."""
    assert validate_url("https://hooks.slack.com/services/T/B/X") == (
        "https://hooks.slack.com/services/T/B/X"
    )
    assert describe_url("https://user:pw@hooks.example:8443/x?token=1") == (
        "https://hooks.example:8443"
    )
    assert json_safe({"a": [math.nan, -math.inf, (1, 2)], 3: object}) == {
        "a": ["NaN", "-Infinity", [1, 2]],
        "3": str(object),
    }


# -- advice ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("format", ["json", "slack"])
def test_advice_reaches_record_webhook_and_log(
    server: Server, format: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A built-in's advice from defaults.yaml is in the alert record, the POST body and the log."""
    advice = " ".join(BUILTIN_RULES["nonfinite"]["advice"].split())
    engine = engine_for(server.url, ("hook", "log"), format=format)
    with caplog.at_level(logging.CRITICAL, logger="outrider.alerts"):
        (alert,) = fire(engine)
    assert alert["advice"] == advice
    body = json.loads(server.next().body)
    if format == "json":
        assert body["advice"] == advice
    else:
        assert body["text"].endswith(f"\nWhat to do: {advice}")
    (line,) = [r.getMessage() for r in caplog.records if r.name == "outrider.alerts"]
    assert line.startswith("outrider alert nonfinite [critical]: non-finite loss")
    assert line.endswith(f" -- what to do: {advice}")
    engine.close(1.0)
