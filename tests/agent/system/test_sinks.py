"""System entries in the sinks: their flat names, Prometheus series and TensorBoard scalars."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing import (  # type: ignore[import-untyped]  # no stubs
    event_accumulator,
)

from agent.system.sampler import SystemSampler
from sinks.base import Batch, Source
from sinks.prometheus import PrometheusSink
from sinks.registry import SinkContext
from sinks.schema import flatten
from sinks.tensorboard import TensorBoardSink
from tests.agent.system.fake_nvml import FakeNvml
from tests.agent.system.support import MB, FakeClock, line_of, with_rates
from tests.helpers import wait_for
from tests.prometheus_server import promtool


def test_flatten_names() -> None:
    """Host fields, process lines and GPU lines become system/..., numbers only, bools left out."""
    entry = {
        "kind": "system",
        "host": "node-a",
        "t": 1.7e9,
        "step": None,
        "rank": -1,
        "seq": 3,
        "cpu_percent": 12.5,
        "memory_used_bytes": 1024,
        "flag": True,
        "processes": [{"pid": 42, "name": "python", "cpu_percent": 150.0, "rss_bytes": 7}],
        "gone": [43],
        "gpus": [{"index": 1, "uuid": "GPU-1", "name": "H100", "temperature_c": 61}],
    }
    assert flatten(entry) == {
        "system/cpu_percent": 12.5,
        "system/memory_used_bytes": 1024.0,
        "system/process/42/cpu_percent": 150.0,
        "system/process/42/rss_bytes": 7.0,
        "system/gpu1/temperature_c": 61.0,
    }
    assert flatten({"kind": "system", "processes": "junk", "gpus": [None, {"x": 1}]}) == {}


# -- the sinks -------------------------------------------------------------------------------


def system_source(host: str = "node-a") -> Source:
    """The agent's own stream, as it sends its alerts: rank -1, world size 0."""
    return Source("run-1", "agent", -1, -1, 0, host, os.getpid())


def stamped(entry: dict[str, Any], seq: int = 0) -> dict[str, Any]:
    """``entry`` as the run store writes it (and sinks receive it)."""
    return {"step": None, "rank": -1, "stream": "agent", "seq": seq, **entry}


Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(sink: PrometheusSink) -> tuple[str, Series]:
    with urllib.request.urlopen(sink.url, timeout=5) as reply:
        text = reply.read().decode()
    series = {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return text, series


@pytest.fixture
def prometheus_sink(tmp_path: Path) -> Iterator[PrometheusSink]:
    sink = PrometheusSink(PrometheusSink.Options(port=0), SinkContext(tmp_path))
    yield sink
    sink.close(5.0)


def test_prometheus_exports_host_process_and_gpu_series(
    prometheus_sink: PrometheusSink, processes: Any
) -> None:
    """Real samples scrape as outrider_host_*/outrider_process_* gauges and DCGM GPU series."""
    trainer = processes("held = b'x' * (50 << 20)\nimport time\ntime.sleep(600)")
    clock = FakeClock()
    sampler = SystemSampler(
        lambda entry: None, pids=lambda: [trainer.pid], nvml=FakeNvml(), clock=clock, host="gpu-7"
    )
    wait_for(
        lambda: line_of(sampler.sample(), trainer.pid)["rss_bytes"] >= 50 * MB,  # type: ignore[index]
        30,
        "the trainer's 50 MB",
    )
    entry = with_rates(sampler, clock)
    prometheus_sink.export([Batch(system_source(), [stamped(entry)], "/nonexistent")])
    text, series = scrape(prometheus_sink)
    host = frozenset({("host", "gpu-7")})
    assert series[("outrider_host_cpus", host)] == entry["cpu_count"]
    assert series[("outrider_host_memory_total_bytes", host)] == entry["memory_total_bytes"]
    assert series[("outrider_host_memory_used_bytes", host)] == entry["memory_used_bytes"]
    assert series[("outrider_host_load1", host)] == entry["load1"]
    assert series[("outrider_host_cpu_utilization_ratio", host)] == pytest.approx(
        entry["cpu_percent"] / 100
    )
    assert 0 <= series[("outrider_host_cpu_utilization_ratio", host)] <= 1
    assert series[("outrider_host_network_receive_bytes_per_second", host)] >= 0
    if "disk_write_bytes_per_s" in entry:
        assert series[("outrider_host_disk_written_bytes_per_second", host)] >= 0
    process = frozenset({("host", "gpu-7"), ("pid", str(trainer.pid))})
    assert series[("outrider_process_resident_memory_bytes", process)] >= 50 * MB
    assert series[("outrider_process_threads", process)] >= 1
    assert series[("outrider_process_children", process)] == 0
    assert ("outrider_process_cpu_cores", process) in series
    gpu = frozenset(
        {
            ("gpu", "0"),
            ("UUID", "GPU-fake-0"),
            ("device", "nvidia0"),
            ("modelName", "NVIDIA H100 80GB HBM3"),
            ("Hostname", "gpu-7"),
        }
    )
    assert series[("DCGM_FI_DEV_GPU_UTIL", gpu)] == 87
    assert series[("DCGM_FI_DEV_MEM_COPY_UTIL", gpu)] == 41
    assert series[("DCGM_FI_DEV_FB_USED", gpu)] == 50 * 1024  # MiB
    assert series[("DCGM_FI_DEV_MEM_CLOCK", gpu)] == 2619
    assert series[("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", gpu)] == 7_000_000  # mJ
    assert series[("DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", gpu)] == 2
    assert series[("DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", gpu)] == 5
    assert series[("DCGM_FI_DEV_XID_ERRORS", gpu)] == 0
    assert not any(
        name == "DCGM_FI_DEV_POWER_USAGE" and ("gpu", "1") in labels for name, labels in series
    )  # the T4 has no power reading: no series, not a 0
    for family in text_string_to_metric_families(text):
        if family.name.startswith(("outrider_host", "outrider_process")):
            assert family.type == "gauge" and family.documentation
    checked = promtool("check", "metrics", stdin=text)
    for problem in (checked.stdout + checked.stderr).splitlines():
        assert problem.startswith("DCGM_FI_") and "snake_case" in problem, problem


def test_prometheus_drops_a_gone_trainers_series_at_once(prometheus_sink: PrometheusSink) -> None:
    """A process line missing from the next sample takes its series with it; the count follows."""
    line = {"pid": 11, "name": "python", "cpu_percent": 250.0, "rss_bytes": 5, "threads": 9}
    first = {"kind": "system", "host": "h", "t": 1.0, "load1": 0.5, "processes": [line]}
    prometheus_sink.export([Batch(system_source(), [stamped(first)], "/x")])
    _, series = scrape(prometheus_sink)
    process = frozenset({("host", "h"), ("pid", "11")})
    assert series[("outrider_process_cpu_cores", process)] == 2.5
    assert prometheus_sink.series_count == 4  # load1 + three process gauges
    second = {"kind": "system", "host": "h", "t": 2.0, "load1": 0.5, "processes": [], "gone": [11]}
    prometheus_sink.export([Batch(system_source(), [stamped(second, 1)], "/x")])
    _, series = scrape(prometheus_sink)
    assert not any(labels == process for _, labels in series)
    assert prometheus_sink.series_count == 1
    assert series[("outrider_series", frozenset())] == 1


def test_prometheus_user_metric_cannot_take_a_host_metric_name(
    prometheus_sink: PrometheusSink,
) -> None:
    """A trainer scalar named like a host gauge goes under outrider_user_, the host gauge stays."""
    trainer = Source("run-1", "s0", 0, 0, 1, "h", 1)
    scalars = {"kind": "scalars", "step": 1, "t": 1.0, "rank": 0, "stream": "s0", "seq": 0}
    prometheus_sink.export(
        [
            Batch(trainer, [{**scalars, "metrics": {"host_load1": 99.0}}], "/x"),
            Batch(
                system_source("h"), [stamped({"kind": "system", "host": "h", "load1": 0.5})], "/x"
            ),
        ]
    )
    _, series = scrape(prometheus_sink)
    assert series[("outrider_host_load1", frozenset({("host", "h")}))] == 0.5
    rank = frozenset({("run", "run-1"), ("rank", "0"), ("host", "h")})
    assert series[("outrider_user_host_load1", rank)] == 99.0


def test_tensorboard_writes_flatten_names_as_scalars(tmp_path: Path) -> None:
    """system entries read back with TensorBoard's reader as system/... scalars, one per sample."""
    run_dir = tmp_path / "runs" / "run-1"
    run_dir.mkdir(parents=True)
    clock = FakeClock()
    sampler = SystemSampler(
        lambda entry: None, pids=lambda: [os.getpid()], nvml=FakeNvml(), clock=clock
    )
    entries = []
    for seq in range(3):
        clock.now += 1.0
        entries.append(stamped(sampler.sample(), seq))
    sink = TensorBoardSink()
    try:
        sink.export([Batch(system_source(), entries, str(run_dir))])
    finally:
        sink.close(5.0)
    reader = event_accumulator.EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={event_accumulator.SCALARS: 0}
    )
    reader.Reload()
    tags = set(reader.Tags()["scalars"])
    expected = set().union(*(flatten(entry) for entry in entries))
    assert tags == expected
    pid = os.getpid()
    for tag in (
        "system/memory_used_bytes",
        f"system/process/{pid}/rss_bytes",
        "system/gpu0/temperature_c",
        "system/gpu1/util_percent",
    ):
        assert tag in tags
    last = entries[-1]
    rss = reader.Scalars(f"system/process/{pid}/rss_bytes")
    assert [event.step for event in rss] == [0, 1, 2]  # no step: the directory's counter
    assert rss[-1].value == pytest.approx(line_of(last, pid)["rss_bytes"], rel=1e-6)  # type: ignore[index]
    assert [e.wall_time for e in reader.Scalars("system/gpu0/temperature_c")] == [
        pytest.approx(entry["t"]) for entry in entries
    ]
    assert "system/gpu0/pcie_tx_bytes_per_s" in tags  # a rate: from the second sample on
    assert len(reader.Scalars("system/gpu0/pcie_tx_bytes_per_s")) == 2
