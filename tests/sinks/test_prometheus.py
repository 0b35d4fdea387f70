"""The prometheus sink: real HTTP scrapes, promtool's linter, and a real Prometheus server."""

from __future__ import annotations

import dataclasses
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from sinks import registry
from sinks.base import Batch, Source
from sinks.health import (
    ActiveAlert,
    AgentHealth,
    AnalysisHealth,
    FiredAlert,
    Health,
    JobCost,
    SinkHealth,
    StreamHealth,
)
from sinks.prometheus import ALERT_COOLDOWN_SECONDS, PrometheusSink
from sinks.prometheus_families import GPU_METRICS
from sinks.registry import SinkContext
from sinks.worker import SinkWorker
from tests.prometheus_server import (
    ALERT_RULES,
    DASHBOARD,
    PrometheusServer,
    dashboard_exprs,
    poll,
    promtool,
    start_prometheus,
)

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def source(rank: int = 0, run: str = "run-1", host: str = "node-a", stream: str = "") -> Source:
    return Source(run, stream or f"s{rank}", rank, rank, 2, host, 100 + rank)


def scalars(step: int, metrics: Mapping[str, Any], t: float = 1.7e9) -> dict[str, Any]:
    return {"kind": "scalars", "step": step, "t": t, "metrics": dict(metrics)}


def batch(src: Source, *entries: dict[str, Any]) -> Batch:
    stamped = [
        {"rank": src.rank, "stream": src.stream, "seq": i, **e} for i, e in enumerate(entries)
    ]
    return Batch(src, stamped, "/nonexistent")


def gpu(index: int, **overrides: Any) -> dict[str, Any]:
    sample = {
        "index": index,
        "uuid": f"GPU-{index:08d}",
        "name": "NVIDIA H100 80GB HBM3",
        "util_percent": 87.0,
        "memory_used_bytes": 40 * 2**30,
        "memory_free_bytes": 40 * 2**30,
        "temperature_c": 61.0,
        "power_watts": 512.5,
        "sm_clock_mhz": 1980.0,
        "pcie_tx_bytes_per_s": 2048.0,
        "pcie_rx_bytes_per_s": 4096.0,
    }
    sample.update(overrides)
    return sample


def stream(
    rank: int,
    received: int,
    lost: int = 0,
    not_stored: dict[str, int] | None = None,
    **dropped: int,
) -> StreamHealth:
    return StreamHealth(
        f"s{rank}",
        rank,
        "node-a",
        received + lost,
        received,
        dropped,
        lost,
        False,
        not_stored or {},
    )


def agent_stats(**overrides: Any) -> AgentHealth:
    """A full snapshot: every family of the agent's health has samples."""
    stats = AgentHealth(
        messages=120,
        records=4000,
        bytes=65536,
        rejected_messages={"malformed": 2},
        rejected_records={"bad_record": 3},
        sinks={
            "prometheus": SinkHealth(Health.OK, 0, 4000, 0, 0, {}, None, 40, {"series": 9}),
            "wandb": SinkHealth(Health.RETRYING, 7, 100, 4, 3, {"queue_full": 12}, "timeout"),
        },
        runs={
            "run-1": [
                stream(0, 2000),
                stream(1, 1500, lost=1, not_stored={"store_full": 30}, queue_full=5),
                # rank 1 restarted: a second stream, summed into the same series
                stream(
                    1,
                    500,
                    not_stored={"store_full": 10, "store_error": 2},
                    queue_full=2,
                    no_agent=1,
                ),
            ]
        },
        analysis=AnalysisHealth(
            stat_jobs={"effective_rank": JobCost(4, 0.5, 0.2, 0.1, 0.4, 0, 0)},
            dropped_batches=2,
            alert_engine={"suppressed": 0, "state_keys": 1, "webhooks": {}},
            alerts_active=[ActiveAlert("loss_spike", "warning", "run-1")],
            alerts_fired=[FiredAlert("loss_spike", "warning", 3)],
        ),
    )
    return dataclasses.replace(stats, **overrides)


def scrape_text(sink: PrometheusSink) -> str:
    with urllib.request.urlopen(sink.url, timeout=5) as reply:
        return str(reply.read().decode())


def series_of(text: str) -> Series:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(sink: PrometheusSink) -> Series:
    return series_of(scrape_text(sink))


def value(series: Series, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def names(series: Series) -> set[str]:
    return {name for name, _ in series}


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_sink(tmp_path: Path, clock: FakeClock) -> Iterator[Any]:
    """Sinks on free ports, closed at the end of the test."""
    made: list[PrometheusSink] = []

    def make(stats: Any = None, **options: Any) -> PrometheusSink:
        sink = PrometheusSink(
            PrometheusSink.Options(port=0, **options),
            SinkContext(tmp_path, agent_stats=stats),
            clock=clock,
        )
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close(5.0)


RANK = {"run": "run-1", "rank": "0", "host": "node-a"}


def test_scrape_shows_scalars_with_run_rank_host_labels(make_sink: Any) -> None:
    """Scalars become <prefix>_<name> gauges labelled run/rank/host; so do step and last-record."""
    sink = make_sink()
    sink.export(
        [
            batch(
                source(0),
                scalars(1, {"loss": 2.5}, t=1.7e9),
                scalars(2, {"loss": 2.25}, t=1.7e9 + 1),
            ),
            batch(source(1), scalars(2, {"loss": 2.0, "lr": 3e-4}, t=1.7e9 + 2)),
        ]
    )
    series = scrape(sink)
    assert value(series, "outrider_loss", **RANK) == 2.25
    assert value(series, "outrider_loss", **{**RANK, "rank": "1"}) == 2.0
    assert value(series, "outrider_lr", **{**RANK, "rank": "1"}) == 3e-4
    assert value(series, "outrider_step", **RANK) == 2
    assert value(series, "outrider_last_record_timestamp_seconds", **RANK) == 1.7e9 + 1
    for name, labels in series:
        if name.startswith(("outrider_loss", "outrider_lr", "outrider_step")):
            assert {key for key, _ in labels} == {"run", "rank", "host"}
    assert sink.url.startswith(f"http://127.0.0.1:{sink.port}/")
    assert sink.port > 0


def test_non_finite_values_are_exported_and_counted(make_sink: Any) -> None:
    """NaN/Infinity (as the run store writes them) are exported as such and counted per rank."""
    sink = make_sink()
    sink.export([batch(source(0), scalars(1, {"loss": 1.0}))])
    assert value(scrape(sink), "outrider_nonfinite_values_total", **RANK) == 0
    sink.export(
        [batch(source(0), scalars(2, {"loss": "NaN", "grad_norm": "Infinity", "lr": "-Infinity"}))]
    )
    series = scrape(sink)
    assert math.isnan(value(series, "outrider_loss", **RANK))
    assert value(series, "outrider_grad_norm", **RANK) == math.inf
    assert value(series, "outrider_lr", **RANK) == -math.inf
    assert value(series, "outrider_nonfinite_values_total", **RANK) == 3


def test_scrape_passes_promtool_check_metrics(make_sink: Any) -> None:
    """promtool's linter finds no problem in a scrape with scalars, NaN and every agent metric."""
    sink = make_sink(stats=agent_stats)
    sink.export(
        [
            batch(source(0), scalars(1, {"loss": "NaN", "val/loss": 1.5, "step": 3})),
            batch(source(1), {"kind": "text", "t": 1.7e9, "step": 4, "name": "x", "text": "y"}),
        ]
    )
    text = scrape_text(sink)
    assert "outrider_sink_up" in text and "NaN" in text
    checked = promtool("check", "metrics", stdin=text)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


def test_every_metric_has_help_text(make_sink: Any) -> None:
    """Every metric family in a full scrape has a non-empty HELP line."""
    sink = make_sink(stats=agent_stats)
    sink.export([batch(source(0), scalars(1, {"loss": 1.0}), {"kind": "system", "gpus": [gpu(0)]})])
    families = list(text_string_to_metric_families(scrape_text(sink)))
    assert len(families) > 20
    for family in families:
        assert family.documentation.strip(), family.name


def test_gpu_samples_use_dcgm_exporter_names_units_and_labels(make_sink: Any) -> None:
    """system entries become DCGM_FI_* gauges in DCGM's units, labelled like dcgm-exporter."""
    sink = make_sink()
    sink.export(
        [
            batch(
                source(0),
                {"kind": "system", "t": 1.7e9, "gpus": [gpu(0), gpu(1, xid_errors=79)]},
            )
        ]
    )
    series = scrape(sink)
    labels = {
        "gpu": "1",
        "UUID": "GPU-00000001",
        "device": "nvidia1",
        "modelName": "NVIDIA H100 80GB HBM3",
        "Hostname": "node-a",
    }
    assert value(series, "DCGM_FI_DEV_GPU_UTIL", **labels) == 87.0
    assert value(series, "DCGM_FI_PROF_GR_ENGINE_ACTIVE", **labels) == pytest.approx(0.87)
    assert value(series, "DCGM_FI_DEV_FB_USED", **labels) == 40 * 1024  # MiB
    assert value(series, "DCGM_FI_DEV_FB_FREE", **labels) == 40 * 1024
    assert value(series, "DCGM_FI_DEV_GPU_TEMP", **labels) == 61.0
    assert value(series, "DCGM_FI_DEV_POWER_USAGE", **labels) == 512.5
    assert value(series, "DCGM_FI_DEV_SM_CLOCK", **labels) == 1980.0
    assert value(series, "DCGM_FI_DEV_PCIE_TX_THROUGHPUT", **labels) == 2.0  # KB/s
    assert value(series, "DCGM_FI_DEV_PCIE_RX_THROUGHPUT", **labels) == 4.0
    assert value(series, "DCGM_FI_DEV_XID_ERRORS", **labels) == 79
    assert (
        "DCGM_FI_DEV_XID_ERRORS",
        frozenset({**labels, "gpu": "0", "UUID": "GPU-00000000", "device": "nvidia0"}.items()),
    ) not in series
    assert "outrider_step" not in names(series)  # a system sample is no training record


def test_gpu_metrics_only_lint_problem_is_dcgm_camelcase_labels(make_sink: Any) -> None:
    """promtool objects only to the camelCase labels that DCGM dashboards require (modelName...)."""
    sink = make_sink()
    sink.export([batch(source(0), {"kind": "system", "gpus": [gpu(0)]})])
    checked = promtool("check", "metrics", stdin=scrape_text(sink))
    problems = [line for line in checked.stdout.splitlines() + checked.stderr.splitlines() if line]
    assert problems, "expected the camelCase label lint on the DCGM families"
    for line in problems:
        assert (
            line.startswith("DCGM_FI_") and "label names should be written in 'snake_case'" in line
        )


def test_agent_health_is_read_at_scrape_time(make_sink: Any) -> None:
    """Agent, probe, sink and stat-job counters come from context.agent_stats() at each scrape."""
    current = {"stats": agent_stats()}
    sink = make_sink(stats=lambda: current["stats"])
    series = scrape(sink)
    assert value(series, "outrider_agent_messages_received_total") == 120
    assert value(series, "outrider_agent_records_received_total") == 4000
    assert value(series, "outrider_agent_received_bytes_total") == 65536
    assert value(series, "outrider_agent_messages_rejected_total", reason="malformed") == 2
    assert value(series, "outrider_agent_records_rejected_total", reason="bad_record") == 3
    rank1 = {"run": "run-1", "rank": "1", "host": "node-a"}
    assert value(series, "outrider_probe_records_dropped_total", **rank1, reason="queue_full") == 7
    assert value(series, "outrider_probe_records_dropped_total", **rank1, reason="no_agent") == 1
    assert value(series, "outrider_probe_records_received_total", **rank1) == 2000
    assert value(series, "outrider_probe_records_lost", **rank1) == 1
    not_stored = "outrider_probe_records_not_stored_total"
    assert value(series, not_stored, **rank1, reason="store_full") == 40
    assert value(series, not_stored, **rank1, reason="store_error") == 2
    assert value(series, "outrider_sink_exported_entries_total", sink="wandb") == 100
    assert value(series, "outrider_sink_failures_total", sink="wandb") == 4
    assert (
        value(series, "outrider_sink_dropped_entries_total", sink="wandb", reason="queue_full")
        == 12
    )
    assert value(series, "outrider_sink_queue_depth", sink="wandb") == 7
    assert value(series, "outrider_sink_up", sink="wandb") == 0
    assert value(series, "outrider_sink_up", sink="prometheus") == 1
    assert value(series, "outrider_sink_health", sink="wandb", state="retrying") == 1
    assert value(series, "outrider_stat_job_duration_seconds_count", job="effective_rank") == 4
    assert value(series, "outrider_stat_job_duration_seconds_sum", job="effective_rank") == 0.5
    assert (
        value(series, "outrider_alerts_active", alert="loss_spike", severity="warning", run="run-1")
        == 1
    )
    assert value(series, "outrider_alerts_total", alert="loss_spike", severity="warning") == 3
    assert value(series, "outrider_analysis_dropped_batches_total") == 2

    analysis = current["stats"].analysis
    assert analysis is not None
    current["stats"] = agent_stats(
        messages=121, analysis=dataclasses.replace(analysis, stat_jobs={})
    )
    series = scrape(sink)
    assert value(series, "outrider_agent_messages_received_total") == 121
    assert "outrider_stat_job_duration_seconds_count" not in names(series)


def test_missing_or_failing_agent_stats_leave_the_scrape_working(make_sink: Any) -> None:
    """agent_stats None, returning None, or raising: training metrics are still served."""

    def broken() -> AgentHealth:
        raise RuntimeError("stats exploded")

    for stats in (None, lambda: None, broken):
        sink = make_sink(stats=stats)
        sink.export([batch(source(0), scalars(1, {"loss": 1.0}))])
        series = scrape(sink)
        assert value(series, "outrider_loss", **RANK) == 1.0
        assert not any(name.startswith("outrider_agent_") for name in names(series))


def test_names_are_sanitized_and_collisions_move_under_user(make_sink: Any) -> None:
    """Invalid characters become _, names of the sink's own metrics go under <prefix>_user_."""
    sink = make_sink()
    sink.export(
        [
            batch(
                source(0),
                scalars(
                    1,
                    {
                        "val/loss": 1.0,
                        "attn.head-3 entropy": 2.0,
                        "step": 7,
                        "series": 8,
                        "agent_messages_received_total": 9,
                        "9lives": 10,
                    },
                ),
            )
        ]
    )
    series = scrape(sink)
    assert value(series, "outrider_val_loss", **RANK) == 1.0
    assert value(series, "outrider_attn_head_3_entropy", **RANK) == 2.0
    assert value(series, "outrider_user_step", **RANK) == 7
    assert value(series, "outrider_step", **RANK) == 1  # the sink's own step is untouched
    assert value(series, "outrider_user_series", **RANK) == 8
    assert value(series, "outrider_user_agent_messages_received_total", **RANK) == 9
    assert value(series, "outrider_9lives", **RANK) == 10


def scrape_openmetrics(sink: PrometheusSink) -> str:
    """What a Prometheus server gets: the OpenMetrics exposition (it asks for it first)."""
    request = urllib.request.Request(sink.url, headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        return str(reply.read().decode())


def host_sample() -> dict[str, Any]:
    """A system entry with a value for every host and trainer-process field."""
    processes = [
        {"pid": 4242, "cpu_percent": 150.0, "rss_bytes": 2**30, "threads": 9, "children": 2}
    ]
    host = {
        "cpu_percent": 50.0, "cpu_count": 8, "load1": 1.5, "memory_used_bytes": 2**33,
        "memory_total_bytes": 2**34, "memory_available_bytes": 2**33, "swap_used_bytes": 0,
        "disk_read_bytes_per_s": 1.0, "disk_write_bytes_per_s": 2.0,
        "net_recv_bytes_per_s": 3.0, "net_sent_bytes_per_s": 4.0,
    }  # fmt: skip
    return {"kind": "system", "t": 1.7e9, **host, "processes": processes, "gpus": [gpu(0)]}


def test_no_scalar_name_clashes_with_a_family_of_the_sinks_own(make_sink: Any) -> None:
    """Scalars named like each outrider family of a full scrape (``alerts``, ...) keep the
    OpenMetrics exposition parseable (no "Clashing name"): they go under <prefix>_user_."""
    full = make_sink(stats=agent_stats)
    full.export([batch(source(0), scalars(1, {"loss": 1.0}), host_sample())])
    own = {
        family.name.removeprefix("outrider_"): family.type
        for family in openmetrics_families(scrape_openmetrics(full))
        if family.name.startswith("outrider_") and family.name != "outrider_loss"
    }
    assert {"alerts", "analysis_dropped_batches", "alerts_active", "host_cpus"} <= set(own)
    taken = {
        f"{name}{suffix}"
        for name, kind in own.items()
        for suffix in {"counter": ("", "_total"), "summary": ("", "_count", "_sum")}.get(
            kind, ("",)
        )
    }
    sink = make_sink(stats=agent_stats)
    sink.export([batch(source(0), scalars(1, dict.fromkeys(taken, 7.0)), host_sample())])
    text = scrape_openmetrics(sink)
    families = {family.name: family for family in openmetrics_families(text)}  # raises on a clash
    for name in taken:
        [sample] = families[f"outrider_user_{name}"].samples
        assert sample.value == 7.0 and sample.labels == RANK, name
    # promtool reads the classic text format: it parses, and lints only the names users chose
    # (a gauge ending in _total) and DCGM's camelCase labels.
    checked = promtool("check", "metrics", stdin=scrape_text(sink))
    for line in (checked.stdout + checked.stderr).splitlines():
        assert line.startswith(("outrider_user_", "DCGM_FI_")), line
    assert value(scrape(sink), "outrider_series_refused_total", reason="name_conflict") == 0


def test_two_names_sanitizing_alike_do_not_overwrite_each_other(make_sink: Any) -> None:
    """The first metric keeps a sanitized name; a second one mapping to it is refused, counted."""
    sink = make_sink()
    sink.export([batch(source(0), scalars(1, {"val/loss": 1.0}), scalars(2, {"val.loss": 99.0}))])
    series = scrape(sink)
    assert value(series, "outrider_val_loss", **RANK) == 1.0
    assert value(series, "outrider_series_refused_total", reason="name_conflict") == 1
    assert value(series, "outrider_series_refused_total", reason="series_cap") == 0


def test_custom_prefix(make_sink: Any) -> None:
    """The prefix option renames every outrider metric, not the DCGM ones."""
    sink = make_sink(prefix="trainmon")
    sink.export([batch(source(0), scalars(1, {"loss": 1.0}), {"kind": "system", "gpus": [gpu(0)]})])
    found = names(scrape(sink))
    assert {"trainmon_loss", "trainmon_step", "trainmon_series", "DCGM_FI_DEV_GPU_UTIL"} <= found
    assert not any(name.startswith("outrider_") for name in found)


def test_series_cap_refuses_new_series_counts_and_alerts_once_per_cooldown(
    make_sink: Any, clock: FakeClock
) -> None:
    """Past max_series new series are refused and counted; old ones update; one alert per 300 s."""
    sink = make_sink(max_series=6)
    # one rank: nonfinite counter + last_record + step + 3 scalars = 6 series
    sink.export([batch(source(0), scalars(1, {"a": 1, "b": 2, "c": 3}))])
    assert sink.series_count == 6 and not sink.series_cap_hit
    sink.export([batch(source(0), scalars(2, {"a": 10, "d": 4, "e": 5}))])
    sink.export([batch(source(1), scalars(2, {"a": 1}))])
    series = scrape(sink)
    assert value(series, "outrider_a", **RANK) == 10
    assert "outrider_d" not in names(series) and "outrider_e" not in names(series)
    assert ("outrider_a", frozenset({**RANK, "rank": "1"}.items())) not in series
    assert value(series, "outrider_series") == 6
    assert value(series, "outrider_series_limit") == 6
    # d, e; then rank 1: its nonfinite counter, last_record, step, a
    assert value(series, "outrider_series_refused_total", reason="series_cap") == 6
    assert sink.counters() == {"series": 6, "refused_series_cap": 6, "refused_name_conflict": 0}
    assert sink.series_cap_hit
    alerts = sink.take_alerts()
    assert len(alerts) == 1
    assert alerts[0]["name"] == "prometheus_series_cap"
    assert alerts[0]["severity"] == "warning"
    assert "max_series" in alerts[0]["message"]
    assert sink.take_alerts() == []

    clock.now += ALERT_COOLDOWN_SECONDS - 1
    sink.export([batch(source(0), scalars(3, {"f": 1}))])
    assert sink.take_alerts() == []
    clock.now += 1
    sink.export([batch(source(0), scalars(4, {"g": 1}))])
    assert len(sink.take_alerts()) == 1


def test_millions_of_names_past_the_cap_keep_memory_bounded(make_sink: Any) -> None:
    """Hostile input: distinct names past the cap are refused without growing the sink's tables."""
    sink = make_sink(max_series=10)
    for start in range(0, 20_000, 1000):
        sink.export([batch(source(0), scalars(1, {f"m{start + i}": 1.0 for i in range(1000)}))])
    assert sink.series_count == 10
    assert sink.refused["series_cap"] == 20_000 - 7  # 3 series per rank, then 7 names fit
    assert len(sink._families) <= 3 + len(GPU_METRICS) + 7  # own + GPU + the names that fit
    assert len(sink._user_names) <= 4 * 10


def test_a_refused_name_cannot_later_write_into_another_metric(
    make_sink: Any, clock: FakeClock
) -> None:
    """A name refused at the cap, once space frees, does not take over a look-alike's metric."""
    sink = make_sink(max_series=4, retire_after_seconds=0)
    sink.export([batch(source(0), scalars(1, {"a": 1.0}))])  # counter, last_record, step, a
    sink.export([batch(source(0), scalars(2, {"val/loss": 5.0}))])  # refused: cap
    sink.export([batch(source(0), {"kind": "bye"})])
    sink.flush(1.0)  # retired: room again
    sink.export([batch(source(1), scalars(3, {"val.loss": 1.0}))])
    sink.export([batch(source(1), scalars(4, {"val/loss": 9.0}))])
    series = scrape(sink)
    assert value(series, "outrider_val_loss", **{**RANK, "rank": "1"}) == 1.0
    assert value(series, "outrider_series_refused_total", reason="name_conflict") == 1


def test_finished_ranks_stop_counting_as_stalled_and_retire(
    make_sink: Any, clock: FakeClock
) -> None:
    """bye drops a rank's last-record time at once and all its series after retire_after_seconds."""
    sink = make_sink(retire_after_seconds=60)
    main, worker = source(0, stream="main"), source(0, stream="dataloader")
    sink.export([batch(main, scalars(1, {"loss": 1.0})), batch(worker, scalars(1, {"x": 1.0}))])
    sink.export([batch(worker, {"kind": "bye", "t": 1.7e9})])  # one of the rank's two streams
    assert "outrider_last_record_timestamp_seconds" in names(scrape(sink))
    sink.export([batch(main, {"kind": "bye", "t": 1.7e9})])
    series = scrape(sink)
    assert "outrider_last_record_timestamp_seconds" not in names(series)
    assert value(series, "outrider_loss", **RANK) == 1.0
    clock.now += 59
    sink.flush(1.0)
    assert "outrider_loss" in names(scrape(sink))
    clock.now += 1
    sink.flush(1.0)
    series = scrape(sink)
    assert not {"outrider_loss", "outrider_x", "outrider_step"} & names(series)
    assert value(series, "outrider_series") == 0 and sink.series_count == 0


def test_run_end_retires_every_rank_of_the_run(make_sink: Any, clock: FakeClock) -> None:
    """run_end (from `outrider run`, rank -1) ends all ranks of that run and no other run."""
    sink = make_sink(retire_after_seconds=10)
    other = source(0, run="run-2")
    sink.export(
        [batch(source(0), scalars(1, {"loss": 1.0})), batch(source(1), scalars(1, {"loss": 2.0}))]
    )
    sink.export([batch(other, scalars(1, {"loss": 3.0}))])
    sink.export([batch(source(-1, stream="launcher"), {"kind": "run_end", "exit_status": 0})])
    clock.now += 10
    sink.flush(1.0)
    series = scrape(sink)
    assert [dict(labels)["run"] for name, labels in series if name == "outrider_loss"] == ["run-2"]
    assert "outrider_last_record_timestamp_seconds" in names(series)


def test_silent_ranks_and_gpus_go_stale(make_sink: Any, clock: FakeClock) -> None:
    """A rank or a host's GPUs with nothing new for stale_after_seconds are removed."""
    sink = make_sink(stale_after_seconds=100)
    sink.export([batch(source(0), scalars(1, {"loss": 1.0}), {"kind": "system", "gpus": [gpu(0)]})])
    clock.now += 50
    sink.export([batch(source(1), scalars(1, {"loss": 2.0}))])
    clock.now += 50
    sink.flush(1.0)
    series = scrape(sink)
    assert [dict(labels)["rank"] for name, labels in series if name == "outrider_loss"] == ["1"]
    assert "DCGM_FI_DEV_GPU_UTIL" not in names(series)


def test_heartbeats_do_not_move_the_last_record_time(make_sink: Any) -> None:
    """Only records the training code made count as activity; sender-thread records do not."""
    sink = make_sink()
    sink.export([batch(source(0), scalars(1, {"loss": 1.0}, t=100.0))])
    sink.export(
        [
            batch(
                source(0),
                {"kind": "heartbeat", "t": 200.0},
                {"kind": "probe_stats", "t": 300.0, "produced": 3, "dropped": {}},
                {"kind": "hello", "t": 400.0, "argv": []},
            )
        ]
    )
    assert value(scrape(sink), "outrider_last_record_timestamp_seconds", **RANK) == 100.0


def test_a_histogram_from_the_trainer_moves_the_last_record_time(make_sink: Any) -> None:
    """probe.watch's histograms reach the sinks as stored ``histogram`` entries, not tensors."""
    sink = make_sink()
    sink.export([batch(source(0), scalars(1, {"loss": 1.0}, t=100.0))])
    histogram = {
        "kind": "histogram",
        "t": 250.0,
        "step": 50,
        "name": "weights/w",
        "edges": [0.0, 1.0],
        "counts": [3],
    }
    sink.export([batch(source(0), histogram)])
    assert value(scrape(sink), "outrider_last_record_timestamp_seconds", **RANK) == 250.0
    assert value(scrape(sink), "outrider_step", **RANK) == 50.0


def test_close_frees_the_port(make_sink: Any) -> None:
    """After close() nothing answers on the port, and a new sink can listen on it again."""
    sink = make_sink()
    port = sink.port
    scrape(sink)
    sink.close(5.0)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(sink.url, timeout=2)
    sink.close(5.0)  # a second close is harmless
    reborn = PrometheusSink(PrometheusSink.Options(port=port), SinkContext(Path("/nonexistent")))
    try:
        assert reborn.port == port
        assert "outrider_series" in names(scrape(reborn))
    finally:
        reborn.close(5.0)


def test_port_taken_raises_oserror_naming_the_port(tmp_path: Path) -> None:
    """A port another process listens on makes the sink fail to start with a clear OSError."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"127.0.0.1:{port}.*port"):
            PrometheusSink(PrometheusSink.Options(port=port), SinkContext(tmp_path))


def test_registry_builds_the_sink_and_rejects_unknown_options(tmp_path: Path) -> None:
    """sinks.registry creates it by name; options are checked (extra keys forbidden)."""
    sink = registry.create("prometheus", {"port": 0, "max_series": 5}, SinkContext(tmp_path))
    try:
        assert isinstance(sink, PrometheusSink)
        assert sink.max_series == 5
    finally:
        sink.close(5.0)
    with pytest.raises(registry.SinkConfigError, match="portt"):
        registry.validate_options("prometheus", {"portt": 1})
    with pytest.raises(registry.SinkConfigError, match="prefix"):
        registry.validate_options("prometheus", {"prefix": "bad-prefix"})
    for name, field in PrometheusSink.Options.model_fields.items():
        assert field.description, name


# -- a real Prometheus server scraping the sink ---------------------------------------------------
@dataclass
class Live:
    sink: PrometheusSink
    prometheus: PrometheusServer
    steps: list[int]


def _feed(worker: SinkWorker, stop: threading.Event, steps: list[int]) -> None:
    """Three ranks logging every 20 ms; rank 2's loss is NaN; one GPU sample per round."""
    step = 0
    while not stop.is_set():
        step += 1
        for rank in range(3):
            loss = "NaN" if rank == 2 else 2.0 / step**0.5
            metrics = {
                "loss": loss,
                "lr": 3e-4,
                "grad_norm": 1.0 + rank,
                "tokens_per_second": 1000.0,
                "samples_per_second": 8.0,
                "step_time_seconds": 0.1 + 0.01 * (step % 5),
                "tokens_total": 1000.0 * step,  # a gauge with a counter-like name
            }
            worker.submit(batch(source(rank), scalars(step, metrics, t=time.time())))
        worker.submit(batch(source(0), {"kind": "system", "gpus": [gpu(0), gpu(1)]}))
        steps.append(step)
        stop.wait(0.02)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """A sink fed through a SinkWorker by a background thread, scraped every 1 s by Prometheus."""
    tmp = tmp_path_factory.mktemp("prometheus")
    sink = PrometheusSink(PrometheusSink.Options(port=0), SinkContext(tmp, agent_stats=agent_stats))
    worker = SinkWorker(sink, flush_interval=0.2)
    stop = threading.Event()
    steps: list[int] = []
    feeder = threading.Thread(target=_feed, args=(worker, stop, steps), daemon=True)
    feeder.start()
    try:
        prometheus = start_prometheus(tmp, [f"127.0.0.1:{sink.port}"], rule_files=[ALERT_RULES])
    except BaseException:
        stop.set()
        feeder.join(5)
        worker.close(5)
        raise
    try:
        yield Live(sink, prometheus, steps)
    finally:
        prometheus.stop()
        stop.set()
        feeder.join(5)
        worker.close(5)


@pytest.mark.slow
def test_real_prometheus_scrapes_the_sink(live: Live) -> None:
    """Prometheus scrapes /metrics: its target is up and outrider_loss has run/rank/host labels."""
    prometheus = live.prometheus
    results = prometheus.wait_for('outrider_loss{rank="0"}', timeout=30)
    labels = results[0]["metric"]
    assert labels == {
        "__name__": "outrider_loss",
        "run": "run-1",
        "rank": "0",
        "host": "node-a",
        "job": "outrider",
        "instance": f"127.0.0.1:{live.sink.port}",
    }
    assert 0 < float(results[0]["value"][1]) < 2.0
    ranks = {r["metric"]["rank"] for r in prometheus.wait_for("outrider_loss")}
    assert ranks == {"0", "1", "2"}
    nan = prometheus.query('outrider_loss{rank="2"}')
    assert nan and nan[0]["value"][1] == "NaN"
    [target] = prometheus.targets()
    assert target["health"] == "up", target
    assert prometheus.wait_for("outrider_tokens_total")  # OpenMetrics scrape accepts the name
    first = float(prometheus.query('outrider_step{rank="0"}')[0]["value"][1])
    poll(
        lambda: float(prometheus.query('outrider_step{rank="0"}')[0]["value"][1]) > first,
        timeout=15,
        what="a newer step scraped",
    )


@pytest.mark.slow
def test_every_dashboard_query_runs_and_returns_data(live: Live) -> None:
    """Each PromQL expression of the Grafana dashboard is valid and finds the fed data."""
    exprs = dashboard_exprs(DASHBOARD)
    assert len(exprs) >= 15
    assert any(gpu for _, _, gpu in exprs) and not all(gpu for _, _, gpu in exprs)
    for title, expr, _ in exprs:
        live.prometheus.wait_for(expr, timeout=30, what=f"panel {title!r}: {expr}")


@pytest.mark.slow
def test_alert_rules_evaluate_against_real_data(live: Live) -> None:
    """alerts.yml loads into Prometheus, every rule evaluates cleanly, NaN loss fires."""
    prometheus = live.prometheus

    def evaluated() -> list[dict[str, Any]]:
        rules = prometheus.rules()
        return rules if rules and all(r["health"] != "unknown" for r in rules) else []

    rules = poll(evaluated, timeout=30, what="every alerting rule evaluated")
    assert len(rules) >= 12
    for rule in rules:
        assert rule["health"] == "ok", rule

    def firing(name: str) -> list[dict[str, Any]]:
        return [
            a
            for a in prometheus.alerts()
            if a["labels"]["alertname"] == name and a["state"] == "firing"
        ]

    [alert] = poll(lambda: firing("OutriderNonFiniteLoss"), 30, "OutriderNonFiniteLoss firing")
    assert alert["labels"]["rank"] == "2"
    [alert] = poll(lambda: firing("OutriderNonFiniteValues"), 30, "OutriderNonFiniteValues")
    assert alert["labels"]["rank"] == "2"
    assert not firing("OutriderRunStalled")
