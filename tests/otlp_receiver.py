"""A real OTLP/HTTP metrics receiver for tests, decoding the real protobufs.

``OTLPReceiver()`` serves ``POST /v1/metrics`` on 127.0.0.1 from a thread, as
an OpenTelemetry Collector's otlp receiver does: it un-gzips a compressed
body, decodes it as ``ExportMetricsServiceRequest`` (package
``opentelemetry-proto``) and answers with an ``ExportMetricsServiceResponse``.
Every data point is kept as a ``Point``; ``status`` makes it refuse pushes
instead (401, 503, ...). ``stop()`` closes the port; ``OTLPReceiver(port)``
serves on a given one again (a collector that comes back).
"""

from __future__ import annotations

import gzip
import threading
import zlib
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

PATH = "/v1/metrics"


@dataclass(frozen=True)
class Point:
    """One data point as the receiver decoded it."""

    name: str
    kind: str  # the metric's data field: gauge, sum, histogram, ...
    value: float
    attributes: dict[str, Any]
    resource: dict[str, Any]
    time_unix_nano: int
    start_time_unix_nano: int
    description: str
    unit: str
    monotonic: bool | None = None
    temporality: int | None = None


def any_value(value: AnyValue) -> Any:
    field = value.WhichOneof("value")
    return getattr(value, field) if field is not None else None


def attributes(pairs: Any) -> dict[str, Any]:
    items: list[KeyValue] = list(pairs)
    return {pair.key: any_value(pair.value) for pair in items}


class OTLPReceiver:
    """``POST /v1/metrics`` on 127.0.0.1 (port 0: any free one), recording what arrives."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.status = status
        self.requests: list[ExportMetricsServiceRequest] = []
        self.encodings: list[str] = []
        self.headers: list[dict[str, str]] = []  # names lower-cased
        self.refused = 0
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != PATH:
                    self.send_error(404)
                    return
                receiver._receive(self, body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port: int = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}{PATH}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _receive(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        encoding = handler.headers.get("Content-Encoding", "")
        if self.status != 200:
            with self._lock:
                self.refused += 1
            handler.send_response(self.status)
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        request = ExportMetricsServiceRequest()
        request.ParseFromString(body)
        with self._lock:
            self.requests.append(request)
            self.encodings.append(encoding)
            self.headers.append({k.lower(): v for k, v in handler.headers.items()})
        reply = ExportMetricsServiceResponse().SerializeToString()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-protobuf")
        handler.send_header("Content-Length", str(len(reply)))
        handler.end_headers()
        handler.wfile.write(reply)

    def points(self) -> list[Point]:
        """Every data point received so far, in arrival order."""
        with self._lock:
            requests = list(self.requests)
        found: list[Point] = []
        for request in requests:
            for resource_metrics in request.resource_metrics:
                resource = attributes(resource_metrics.resource.attributes)
                for scope_metrics in resource_metrics.scope_metrics:
                    for metric in scope_metrics.metrics:
                        kind = metric.WhichOneof("data")
                        data = getattr(metric, kind)
                        for point in data.data_points:
                            number = point.WhichOneof("value")
                            found.append(
                                Point(
                                    metric.name,
                                    kind,
                                    float(getattr(point, number)),
                                    attributes(point.attributes),
                                    resource,
                                    point.time_unix_nano,
                                    point.start_time_unix_nano,
                                    metric.description,
                                    metric.unit,
                                    getattr(data, "is_monotonic", None),
                                    getattr(data, "aggregation_temporality", None),
                                )
                            )
        return found

    def latest(self, name: str, **attrs: Any) -> float | None:
        """The last value received for ``name`` with exactly these attributes; None if none."""
        values = [p.value for p in self.points() if p.name == name and p.attributes == attrs]
        return values[-1] if values else None

    def names(self) -> set[str]:
        return {point.name for point in self.points()}

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)
