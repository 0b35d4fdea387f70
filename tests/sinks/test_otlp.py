"""The otlp sink, through a real SinkWorker, into a real OTLP receiver decoding the protobufs."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.config import DEFAULT_SINKS, DEFAULT_YAML, AgentConfig
from sinks import registry
from sinks.base import Batch, Source
from sinks.health import Health
from sinks.otlp import ALERT_COOLDOWN_SECONDS, OTLPSink, instrument_name
from sinks.registry import SinkConfigError, SinkContext
from sinks.worker import SinkWorker
from tests.helpers import REPO
from tests.otlp_receiver import OTLPReceiver
from tests.prometheus_server import free_port, poll

RANK0 = {"run": "run-1", "rank": 0, "host": "node-a"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source(rank: int = 0, run: str = "run-1", host: str = "node-a", stream: str = "") -> Source:
    return Source(run, stream or f"s{rank}", rank, rank, 2, host, 100 + rank)


def scalars(step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    return {"kind": "scalars", "step": step, "t": 1.7e9 + step, "metrics": dict(metrics)}


def batch(src: Source, *entries: dict[str, Any]) -> Batch:
    stamped = [
        {"rank": src.rank, "stream": src.stream, "seq": i, **e} for i, e in enumerate(entries)
    ]
    return Batch(src, stamped, "/nonexistent")


@pytest.fixture
def receiver() -> Iterator[OTLPReceiver]:
    server = OTLPReceiver()
    yield server
    server.stop()


@pytest.fixture
def workers() -> Iterator[list[SinkWorker]]:
    """Workers closed at the end of the test (each closes its sink)."""
    made: list[SinkWorker] = []
    yield made
    for worker in made:
        worker.close(10)


def start(workers: list[SinkWorker], endpoint: str, **options: Any) -> tuple[OTLPSink, SinkWorker]:
    """An otlp sink pushing every 50 ms, fed by a real worker with quick retries."""
    options.setdefault("export_interval", 0.05)
    sink = OTLPSink(OTLPSink.Options(endpoint=endpoint, **options))
    worker = SinkWorker(sink, export_interval=0.05, flush_interval=0.1, backoff=0.05, retries=2)
    workers.append(worker)
    return sink, worker


def test_scalars_arrive_as_gauges_with_run_rank_host_and_the_resource(
    receiver: OTLPReceiver, workers: list[SinkWorker]
) -> None:
    """loss/lr reach the receiver as outrider.* gauges; attributes run/rank/host; resource set."""
    _, worker = start(
        workers,
        receiver.url,
        service_name="trainer-a",
        resource_attributes={"deployment.environment": "test", "cluster": "c1"},
        headers={"Authorization": "Bearer s3cret"},
    )
    worker.submit(batch(source(0), scalars(1, {"loss": 2.5}), scalars(2, {"loss": 2.25})))
    worker.submit(batch(source(1), scalars(2, {"loss": 2.0, "lr": 3e-4})))
    poll(lambda: receiver.latest("outrider.lr", **{**RANK0, "rank": 1}), 30, "lr of rank 1")
    assert receiver.latest("outrider.loss", **RANK0) == 2.25
    assert receiver.latest("outrider.loss", **{**RANK0, "rank": 1}) == 2.0
    assert receiver.latest("outrider.lr", **{**RANK0, "rank": 1}) == 3e-4
    assert receiver.latest("outrider.step", **RANK0) == 2
    points = receiver.points()
    assert {p.name for p in points} == {"outrider.loss", "outrider.lr", "outrider.step"}
    for point in points:
        assert point.kind == "gauge"
        assert set(point.attributes) == {"run", "rank", "host"}  # never the step
        assert point.resource["service.name"] == "trainer-a"
        assert point.resource["deployment.environment"] == "test"
        assert point.resource["cluster"] == "c1"
        assert point.time_unix_nano > 1.7e18
    assert set(receiver.encodings) == {"gzip"}
    assert receiver.headers[0]["authorization"] == "Bearer s3cret"
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"


def test_derived_scalars_and_alerts_are_pushed(
    receiver: OTLPReceiver, workers: list[SinkWorker]
) -> None:
    """The agent's derived scalars are gauges of their rank; alerts a cumulative counter."""
    sink, worker = start(workers, receiver.url)
    agent = source(0, stream="agent")
    alert = {"kind": "alert", "name": "loss_nan", "severity": "critical", "run": "run-1"}
    worker.submit(batch(agent, scalars(5, {"step_time_seconds/p99": 0.25}), alert, alert))
    poll(lambda: receiver.latest("outrider.alerts", run="run-1", alert="loss_nan",
                                 severity="critical"), 30, "the alert counter")  # fmt: skip
    assert receiver.latest("outrider.step_time_seconds/p99", **RANK0) == 0.25
    assert receiver.latest("outrider.step", **RANK0) is None  # a derived figure has no step
    counter = [p for p in receiver.points() if p.name == "outrider.alerts"][-1]
    assert counter.value == 2
    assert counter.kind == "sum" and counter.monotonic
    assert counter.temporality == 2  # cumulative
    assert 0 < counter.start_time_unix_nano <= counter.time_unix_nano
    assert sink.counters()["series"] == 2


def test_non_finite_values_are_pushed_as_doubles_and_counted(
    receiver: OTLPReceiver, workers: list[SinkWorker]
) -> None:
    """NaN/Infinity as the run store writes them arrive as IEEE NaN/inf and are counted once."""
    sink, worker = start(workers, receiver.url)
    worker.submit(
        batch(source(0), scalars(1, {"loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity"}))
    )
    poll(lambda: receiver.latest("outrider.lr", **RANK0), 30, "lr")
    loss = receiver.latest("outrider.loss", **RANK0)
    assert loss is not None and math.isnan(loss)
    assert receiver.latest("outrider.grad_norm", **RANK0) == math.inf
    assert receiver.latest("outrider.lr", **RANK0) == -math.inf
    assert sink.counters()["nonfinite_values"] == 3


def test_instrument_names_follow_opentelemetry_rules() -> None:
    """Letters, digits, _ . - / are kept; other characters become _; 255 characters at most."""
    assert instrument_name("outrider", "loss") == "outrider.loss"
    assert instrument_name("outrider", "train/loss") == "outrider.train/loss"
    assert instrument_name("outrider", "acc top-1 (%)") == "outrider.acc_top-1____"
    assert instrument_name("outrider", "é" * 300) == "outrider." + "_" * 246


def test_names_taken_by_the_sink_or_another_metric(
    receiver: OTLPReceiver, workers: list[SinkWorker]
) -> None:
    """A user 'step' moves under .user.; a name sanitizing like an earlier one is refused."""
    sink, worker = start(workers, receiver.url)
    worker.submit(batch(source(0), scalars(7, {"step": 70, "a b": 1.0, "a_b": 2.0, "a?b": 3.0})))
    poll(lambda: receiver.latest("outrider.user.step", **RANK0), 30, "the user's step")
    assert receiver.latest("outrider.step", **RANK0) == 7
    assert receiver.latest("outrider.a_b", **RANK0) == 1.0  # the first to claim the name
    assert sink.counters()["refused_name_conflict"] == 2


def test_collector_down_then_up_later_points_arrive_and_failures_are_counted(
    workers: list[SinkWorker],
) -> None:
    """Pushes to a closed port fail (counted, retried, health failing); once up, data flows."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}/v1/metrics"
    sink, worker = start(workers, endpoint, timeout=0.5)
    worker.submit(batch(source(0), scalars(1, {"loss": "NaN"})))
    poll(lambda: worker.health is Health.FAILING, 30, "health failing")
    snapshot = worker.snapshot()
    assert snapshot.failures >= 3 and snapshot.retries >= 2
    assert snapshot.dropped.get("export_failed") == 1
    assert snapshot.last_error is not None
    assert endpoint in snapshot.last_error and "refused" in snapshot.last_error
    assert sink.counters()["push_failures"] >= 3
    assert sink.counters()["nonfinite_values"] == 1  # retries do not count the values again

    receiver = OTLPReceiver(port)
    try:
        worker.submit(batch(source(0), scalars(2, {"loss": 1.5})))
        poll(lambda: receiver.latest("outrider.loss", **RANK0) == 1.5, 30, "loss after recovery")
        poll(lambda: worker.health is Health.OK, 30, "health ok again")
        assert receiver.latest("outrider.step", **RANK0) == 2
        assert sink.counters()["points_pushed"] >= 2
    finally:
        worker.close(10)
        receiver.stop()


def test_a_collector_that_refuses_gives_an_error_naming_the_status(
    workers: list[SinkWorker],
) -> None:
    """A 401 from the collector is a failed push whose error says 401."""
    receiver = OTLPReceiver(status=401)
    try:
        _, worker = start(workers, receiver.url)
        worker.submit(batch(source(0), scalars(1, {"loss": 1.0})))
        poll(lambda: worker.health is Health.FAILING, 30, "health failing")
        assert receiver.refused >= 1 and receiver.requests == []
        assert "401" in (worker.snapshot().last_error or "")
    finally:
        for worker in workers:
            worker.close(10)
        workers.clear()
        receiver.stop()


def test_series_cap_refuses_new_series_counts_and_alerts_once_per_cooldown(
    receiver: OTLPReceiver,
) -> None:
    """Past max_series new series are refused and counted; old ones update; one alert per 300 s."""
    clock = FakeClock()
    sink = OTLPSink(OTLPSink.Options(endpoint=receiver.url, max_series=4), clock=clock)
    try:
        sink.export([batch(source(0), scalars(1, {"a": 1, "b": 2, "c": 3}))])  # step + 3
        assert sink.series_count == 4 and not sink.series_cap_hit
        clock.now += 20
        sink.export([batch(source(0), scalars(2, {"a": 10, "d": 4}))])
        sink.export([batch(source(1), scalars(2, {"a": 1}))])  # rank 1: step, a
        assert sink.counters()["refused_series_cap"] == 3
        alerts = sink.take_alerts()
        assert [(a["name"], a["severity"]) for a in alerts] == [("otlp_series_cap", "warning")]
        assert "max_series" in alerts[0]["message"]
        assert sink.take_alerts() == []
        clock.now += ALERT_COOLDOWN_SECONDS - 1
        sink.export([batch(source(0), scalars(3, {"e": 1}))])
        assert sink.take_alerts() == []
        clock.now += 1
        sink.export([batch(source(0), scalars(4, {"f": 1}))])
        assert len(sink.take_alerts()) == 1
        clock.now += 20
        sink.flush(5)
        last = receiver.requests[-1]
        pushed = {m.name for m in last.resource_metrics[0].scope_metrics[0].metrics}
        assert pushed == {"outrider.a", "outrider.b", "outrider.c", "outrider.step"}
        assert receiver.latest("outrider.a", **RANK0) == 10
    finally:
        sink.close(5)


def test_many_distinct_names_past_the_cap_keep_the_tables_bounded(
    receiver: OTLPReceiver,
) -> None:
    """Hostile input: distinct names past the cap are refused without growing the sink's tables."""
    sink = OTLPSink(OTLPSink.Options(endpoint=receiver.url, max_series=10, export_interval=1e9))
    try:
        for start_at in range(0, 20_000, 1000):
            metrics = {f"m{start_at + i}": 1.0 for i in range(1000)}
            sink.export([batch(source(0), scalars(1, metrics))])
        assert sink.series_count == 10
        assert sink.refused["series_cap"] == 20_000 - 9  # step, then 9 names fit
        assert len(sink._names) == 9 and len(sink._claims) == 9
    finally:
        sink.close(5)


def test_finished_ranks_retire_and_their_names_free_up(receiver: OTLPReceiver) -> None:
    """After bye and retire_after_seconds a rank's series are no longer pushed."""
    clock = FakeClock()
    sink = OTLPSink(
        OTLPSink.Options(endpoint=receiver.url, retire_after_seconds=60, export_interval=0),
        clock=clock,
    )
    try:
        src = source(0)
        sink.export([batch(src, scalars(1, {"loss": 1.0}), {"kind": "bye"})])
        clock.now += 59
        sink.flush(5)
        assert sink.series_count == 2
        clock.now += 1
        sink.flush(5)
        assert sink.series_count == 0 and sink._claims == {} and sink._names == {}
        sink.export([batch(source(1), scalars(2, {"loss": 2.0}))])
        assert {p.name for p in receiver.points()[-2:]} == {"outrider.loss", "outrider.step"}
        assert receiver.points()[-1].attributes["rank"] == 1
    finally:
        sink.close(5)


# -- options ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"endpoint": "127.0.0.1:4318"}, "not an http:// or https:// URL"),
        ({"endpoint": "ftp://collector/v1/metrics"}, "not an http:// or https:// URL"),
        ({"endpoint": "http://127.0.0.1:notaport/v1/metrics"}, "Port could not be cast"),
        ({"endpoint": "http://collector.example:4318"}, "insecure: true"),
        ({"protocol": "grpc"}, "http/protobuf"),
        ({"headers": {"bad name": "x"}}, "not a valid HTTP header name"),
        ({"max_series": 0}, "greater than 0"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_options_are_clear_errors_naming_the_option(
    options: dict[str, Any], problem: str
) -> None:
    """Config validation names the bad option and says what is wrong."""
    with pytest.raises(SinkConfigError) as raised:
        registry.validate_options("otlp", options)
    assert problem in str(raised.value)
    assert str(raised.value).startswith("sink 'otlp': ")


def test_endpoints_accepted() -> None:
    """A base URL gets /v1/metrics; https and loopback http need nothing more."""
    validate = registry.validate_options
    assert validate("otlp", {"endpoint": "http://localhost:4318"}).endpoint == (  # type: ignore[attr-defined]
        "http://localhost:4318/v1/metrics"
    )
    remote = validate("otlp", {"endpoint": "https://gw.example/otlp/v1/metrics"})
    assert remote.endpoint == "https://gw.example/otlp/v1/metrics"  # type: ignore[attr-defined]
    plain = validate("otlp", {"endpoint": "http://gw.example:4318/", "insecure": True})
    assert plain.endpoint == "http://gw.example:4318/v1/metrics"  # type: ignore[attr-defined]
    sink = registry.create("otlp", {}, SinkContext(Path("/nonexistent")))
    assert isinstance(sink, OTLPSink) and sink.endpoint == "http://127.0.0.1:4318/v1/metrics"


def test_otlp_is_known_but_not_a_default_sink() -> None:
    """The otlp sink is found by name, and the defaults stay tensorboard, prometheus, wandb."""
    assert "otlp" in registry.known_names()
    assert DEFAULT_SINKS == ("tensorboard", "prometheus", "wandb")
    assert "otlp" not in yaml.safe_load(DEFAULT_YAML)["sinks"]
    assert set(AgentConfig().enabled_sinks()) == set(DEFAULT_SINKS)


def test_importing_the_sink_does_not_import_the_sdk() -> None:
    """The SDK is imported when the sink prepares, not when the agent loads the module."""
    code = (
        "import sys, sinks.otlp\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], cwd=REPO, env={"PYTHONPATH": str(REPO)}, check=False,
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_collector_config_example_parses() -> None:
    """deploy/otel/collector.yaml: valid YAML, an otlp receiver feeding a metrics pipeline."""
    config = yaml.safe_load((REPO / "deploy" / "otel" / "collector.yaml").read_text())
    assert "http" in config["receivers"]["otlp"]["protocols"]
    pipeline = config["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["otlp"]
    for exporter in pipeline["exporters"]:
        assert exporter in config["exporters"]
    for processor in pipeline.get("processors", []):
        assert processor in config["processors"]


def test_docs_list_every_option() -> None:
    """docs/sinks.md's OTLP section has a row for each of the sink's options."""
    text = (REPO / "docs" / "sinks.md").read_text()
    section = text.split("## OpenTelemetry (OTLP)", 1)[1].split("\n## ", 1)[0]
    for option in OTLPSink.Options.model_fields:
        assert f"| `{option}` |" in section, option
