"""The GPU lines through a fake NVML with pynvml's own errors, and through the real driver."""

from __future__ import annotations

import logging
import time
from typing import Any

import pynvml
import pytest

from agent.system.sampler import SystemSampler
from sinks.schema import flatten
from tests.agent.system.fake_nvml import Event, FakeDevice, FakeNvml
from tests.agent.system.support import LOGGER, FakeClock


def test_gpu_fields_from_nvml_with_unsupported_ones_absent() -> None:
    """Every NVML field in its unit; NotSupported fields are absent and never asked again."""
    nvml = FakeNvml()
    clock = FakeClock()
    sampler = SystemSampler(lambda entry: None, nvml=nvml, clock=clock)
    first = sampler.sample()
    h100, t4 = first["gpus"]
    assert h100 == {
        "index": 0,
        "uuid": "GPU-fake-0",
        "name": "NVIDIA H100 80GB HBM3",
        "util_percent": 87.0,
        "memory_util_percent": 41.0,
        "memory_used_bytes": 50 << 30,
        "memory_free_bytes": 30 << 30,
        "memory_total_bytes": 80 << 30,
        "temperature_c": 61.0,
        "power_watts": 512.5,
        "sm_clock_mhz": 1980.0,
        "mem_clock_mhz": 2619.0,
        "energy_joules": 7000.0,
        "ecc_dbe_volatile_total": 2,
        "ecc_sbe_volatile_total": 5,
        "xid_errors": 0,  # registered for XID events, none seen
    }  # no PCIe rates on the first sample: they come from counter deltas
    for absent in ("power_watts", "energy_joules", "ecc_dbe_volatile_total", "xid_errors"):
        assert absent not in t4
    assert t4["pcie_tx_bytes_per_s"] == 300 * 1024  # no counters: NVML's sampled KB/s
    assert t4["pcie_rx_bytes_per_s"] == 700 * 1024
    assert t4["name"] == "Tesla T4" and t4["util_percent"] == 87.0

    nvml.devices[0].tx += 4_000_000
    nvml.devices[0].rx += 8_000_000
    clock.now += 2.0
    h100 = sampler.sample()["gpus"][0]
    assert h100["pcie_tx_bytes_per_s"] == 2_000_000
    assert h100["pcie_rx_bytes_per_s"] == 4_000_000
    calls = dict(nvml.calls)
    sampler.sample()
    assert nvml.calls["power"] == calls["power"] + 1  # only the H100 is asked again
    assert nvml.calls["ecc"] == calls["ecc"] + 2
    assert nvml.calls["field_values"] == calls["field_values"] + 1  # the T4 fell back for good
    assert nvml.calls["pcie_throughput"] == calls["pcie_throughput"] + 2
    assert sampler.counters()["nvml_errors"] == 0
    assert nvml.registered == [0]
    assert sampler.close(1.0) and nvml.initialized == 0


def test_xid_events_set_the_last_xid() -> None:
    """An XID event waiting in NVML's event set becomes that GPU's xid_errors (the last one)."""
    nvml = FakeNvml()
    sampler = SystemSampler(lambda entry: None, nvml=nvml)
    assert sampler.sample()["gpus"][0]["xid_errors"] == 0
    xid = pynvml.nvmlEventTypeXidCriticalError
    nvml.events = [Event(nvml.devices[0], xid, 48), Event(nvml.devices[0], xid, 79)]
    assert sampler.sample()["gpus"][0]["xid_errors"] == 79
    assert sampler.sample()["gpus"][0]["xid_errors"] == 79  # the last one, until another comes


def test_other_nvml_errors_are_counted_and_the_field_asked_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A GPU error other than NotSupported drops the field this time only, counted, logged once."""
    nvml = FakeNvml()
    failing = {"on": True}
    real = nvml.nvmlDeviceGetTemperature

    def temperature(device: FakeDevice, sensor: int) -> int:
        if failing["on"]:
            raise pynvml.NVMLError_GpuIsLost()
        return real(device, sensor)

    nvml.nvmlDeviceGetTemperature = temperature  # type: ignore[method-assign]
    sampler = SystemSampler(lambda entry: None, nvml=nvml)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for _ in range(3):
            assert all("temperature_c" not in gpu for gpu in sampler.sample()["gpus"])
    assert sampler.counters()["nvml_errors"] == 6
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "GPU is lost" in warnings[0].getMessage()
    failing["on"] = False
    assert sampler.sample()["gpus"][0]["temperature_c"] == 61.0


def _nvml_driver() -> bool:
    """Whether this machine's NVML starts (an NVIDIA driver is loaded)."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


@pytest.mark.skipif(not _nvml_driver(), reason="needs an NVIDIA driver")
def test_real_nvml_reports_every_gpu_as_nvml_itself_does() -> None:
    """With the machine's own driver: one entry per GPU, identity and memory as NVML reads
    them directly, utilisation in range, PCIe rates (where given) not negative, no errors."""
    sampler = SystemSampler(lambda entry: None)
    first = sampler.sample()
    time.sleep(0.5)
    second = sampler.sample()
    pynvml.nvmlInit()
    try:
        count = pynvml.nvmlDeviceGetCount()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        uuids = [pynvml.nvmlDeviceGetUUID(h) for h in handles]
        totals = [pynvml.nvmlDeviceGetMemoryInfo(h).total for h in handles]
    finally:
        pynvml.nvmlShutdown()
    for entry in (first, second):
        assert [gpu["index"] for gpu in entry["gpus"]] == list(range(count))
        assert [gpu["uuid"] for gpu in entry["gpus"]] == uuids
        assert [gpu["memory_total_bytes"] for gpu in entry["gpus"]] == totals
        for gpu in entry["gpus"]:
            assert 0 <= gpu["util_percent"] <= 100
            assert 0 <= gpu["memory_used_bytes"] <= gpu["memory_total_bytes"]
            assert gpu["name"]
    for gpu in second["gpus"]:
        # PCIe rates: from counter deltas (second sample) or NVML's own sampled rate.
        assert gpu.get("pcie_tx_bytes_per_s", 0) >= 0 and gpu.get("pcie_rx_bytes_per_s", 0) >= 0
    flat = flatten(second)
    assert flat["system/gpu0/memory_total_bytes"] == float(totals[0])
    assert sampler.counters()["nvml_errors"] == 0
    assert sampler.close(1.0)


@pytest.mark.parametrize(
    "nvml",
    [
        pytest.param("default", id="real-pynvml-on-this-machine"),
        pytest.param(FakeNvml(pynvml.NVMLError_DriverNotLoaded()), id="driver-not-loaded"),
        pytest.param(None, id="none"),
    ],
)
def test_no_gpu_means_one_info_line_and_no_gpus_key(
    nvml: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """NVML absent, failing to init, or None: one info line, no warnings, no `gpus` in samples."""
    if nvml == "default":
        if _nvml_driver():
            pytest.skip("this machine has an NVIDIA driver: the no-GPU path needs one without")
        sampler = SystemSampler(lambda entry: None)
    else:
        sampler = SystemSampler(lambda entry: None, nvml=nvml)
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        for _ in range(3):
            assert "gpus" not in sampler.sample()
        assert sampler.close(1.0)
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1, [r.getMessage() for r in records]
    assert records[0].levelno == logging.INFO
    assert "no NVIDIA GPU/driver: GPU metrics off (" in records[0].getMessage()
    assert sampler.counters()["nvml_errors"] == 0
