"""The system sampler on this real host, its GPU path through a fake NVML, and both sinks."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pynvml
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tensorboard.backend.event_processing import (  # type: ignore[import-untyped]  # no stubs
    event_accumulator,
)

from agent.system import sampler as system
from agent.system.sampler import SystemSampler
from sinks.base import Batch, Source
from sinks.prometheus import PrometheusSink
from sinks.registry import SinkContext
from sinks.schema import flatten
from sinks.tensorboard import TensorBoardSink
from tests.helpers import PYTHON, wait_for
from tests.prometheus_server import promtool

MB = 1 << 20
LOGGER = "outrider.agent.system"

# A trainer: holds 200 MB, starts two workers (30 MB each), one of which spins a core.
TRAINER = """
import subprocess, sys, time
held = b"x" * (200 << 20)
worker = "held = b'y' * (30 << 20)\\nimport time\\nwhile {spin}: pass\\ntime.sleep(600)"
children = [
    subprocess.Popen([sys.executable, "-c", worker.format(spin=spin)]) for spin in (True, False)
]
time.sleep(600)
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def spawn(code: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, "-c", code], start_new_session=True)


@pytest.fixture
def processes() -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start Python processes (each in its own process group); all are killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(code: str) -> subprocess.Popen[bytes]:
        process = spawn(code)
        started.append(process)
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def line_of(entry: dict[str, Any], pid: int) -> dict[str, Any] | None:
    return next((p for p in entry["processes"] if p["pid"] == pid), None)


def with_rates(sampler: SystemSampler, clock: FakeClock) -> dict[str, Any]:
    """The next sample whose host CPU counters moved (so it has cpu_percent), 1 s of clock apart."""

    def attempt() -> dict[str, Any] | None:
        clock.now += 1.0
        entry = sampler.sample()
        return entry if "cpu_percent" in entry else None

    result: dict[str, Any] = wait_for(attempt, 10, "a sample with host CPU %")
    return result


@pytest.fixture(params=["proc-children", "process-table"])
def children_walk(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with each way of finding a trainer's descendants."""
    if request.param == "proc-children":
        if not system._PROC_CHILDREN:
            pytest.skip("this kernel has no /proc/<pid>/task/<tid>/children")
    else:
        monkeypatch.setattr(system, "_PROC_CHILDREN", False)
    return str(request.param)


def no_gpus(**kwargs: Any) -> SystemSampler:
    """A sampler that never touches NVML (the GPU path has its own tests)."""
    return SystemSampler(lambda entry: None, nvml=None, **kwargs)


# -- host and processes, on this machine -------------------------------------------------------


def test_host_fields_are_present_and_sane() -> None:
    """A sample has the host's CPU, load, memory and swap, within the limits of this machine."""
    sampler = no_gpus(host="node-a")
    entry = sampler.sample()
    assert entry["kind"] == "system" and entry["host"] == "node-a"
    assert abs(entry["t"] - time.time()) < 60
    assert entry["cpu_count"] == psutil.cpu_count() and entry["cpu_count"] >= 1
    assert entry["load1"] >= 0
    total = psutil.virtual_memory().total
    assert entry["memory_total_bytes"] == total
    assert 0 < entry["memory_used_bytes"] <= total
    assert 0 < entry["memory_available_bytes"] <= total
    assert entry["swap_used_bytes"] >= 0
    assert entry["processes"] == [] and "gone" not in entry and "gpus" not in entry
    for rate in ("disk_read_bytes_per_s", "net_recv_bytes_per_s", "cpu_percent"):
        assert rate not in entry  # the first sample only primes the counters
    sampler.close(1.0)


def test_second_sample_has_rates_and_cpu_percent() -> None:
    """Rates and host CPU % come from counter deltas: present, finite and non-negative next time."""
    sampler = no_gpus()
    sampler.sample()
    burn_until = time.monotonic() + 0.1
    while time.monotonic() < burn_until:  # CPU time for the host counters to move
        pass
    entry = sampler.sample()
    assert 0 < entry["cpu_percent"] <= 100
    for rate in ("net_recv_bytes_per_s", "net_sent_bytes_per_s"):
        assert entry[rate] >= 0
    if psutil.disk_io_counters() is not None:
        assert entry["disk_read_bytes_per_s"] >= 0 and entry["disk_write_bytes_per_s"] >= 0


def test_disk_writes_show_in_the_write_rate(tmp_path: Path) -> None:
    """64 MB written and fsynced between two samples make disk_write_bytes_per_s positive."""
    if psutil.disk_io_counters() is None:
        pytest.skip("this platform has no disk I/O counters (the None path is tested below)")
    mounts = [p for p in psutil.disk_partitions(all=True) if tmp_path.is_relative_to(p.mountpoint)]
    if max(mounts, key=lambda p: len(p.mountpoint)).fstype in ("tmpfs", "ramfs"):
        pytest.skip(f"{tmp_path} is in memory: writing there reaches no disk")
    clock = FakeClock()
    sampler = no_gpus(clock=clock)
    sampler.sample()
    with open(tmp_path / "blob", "wb") as blob:
        for _ in range(64):
            blob.write(os.urandom(MB))
        blob.flush()
        os.fsync(blob.fileno())
    clock.now += 2.0
    entry = sampler.sample()
    # the disk counters are the whole host's; ours alone are 32 MB/s over the 2 s of clock
    assert entry["disk_write_bytes_per_s"] >= 16 * MB


def test_no_disk_counters_means_no_disk_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where psutil has no disk counters (None), samples leave the disk rates out, nothing fails."""
    monkeypatch.setattr(psutil, "disk_io_counters", lambda *args, **kwargs: None)
    clock = FakeClock()
    sampler = no_gpus(clock=clock)
    sampler.sample()
    clock.now += 1.0
    entry = sampler.sample()
    assert "disk_read_bytes_per_s" not in entry and "disk_write_bytes_per_s" not in entry
    assert entry["net_recv_bytes_per_s"] >= 0
    assert sampler.counters()["sample_errors"] == 0


def test_trainer_line_sums_its_children(processes: Any, children_walk: str) -> None:
    """A trainer's line sums its workers: RSS >= 260 MB, 2 children, one spinning core of CPU."""
    trainer = processes(TRAINER)
    sampler = no_gpus(pids=lambda: [trainer.pid], children_scan_interval=0)

    def summed() -> dict[str, Any] | None:
        line = line_of(sampler.sample(), trainer.pid)
        assert line is not None, "the trainer is running"
        return line if line["children"] == 2 and line["rss_bytes"] >= 260 * MB else None

    line = wait_for(summed, 30, "the trainer and its two workers at full size")
    assert line["name"].startswith("python")
    assert line["threads"] >= 3

    def busy() -> dict[str, Any] | None:
        time.sleep(0.2)  # the interval the CPU share is measured over
        line = line_of(sampler.sample(), trainer.pid)
        assert line is not None
        return line if line.get("cpu_percent", 0) >= 30 else None

    line = wait_for(busy, 30, "the spinning worker's CPU in its trainer's line")
    assert line["cpu_percent"] <= 100 * psutil.cpu_count() + 10


def test_children_are_found_by_the_periodic_scan(
    processes: Any, tmp_path: Path, children_walk: str
) -> None:
    """A worker started after a scan joins its trainer's line at the next scan, not before."""
    go = tmp_path / "go"
    trainer = processes(
        "import os, subprocess, sys, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        "time.sleep(600)"
    )
    clock = FakeClock()
    sampler = no_gpus(pids=lambda: [trainer.pid], clock=clock, children_scan_interval=5.0)
    assert line_of(sampler.sample(), trainer.pid)["children"] == 0  # type: ignore[index]
    go.touch()
    wait_for(lambda: psutil.Process(trainer.pid).children(), 30, "the trainer's worker")
    clock.now += 4.0
    assert line_of(sampler.sample(), trainer.pid)["children"] == 0  # type: ignore[index]
    clock.now += 1.0
    assert line_of(sampler.sample(), trainer.pid)["children"] == 1  # type: ignore[index]


def test_grandchildren_and_children_of_other_threads_are_found(
    processes: Any, children_walk: str
) -> None:
    """A worker forked by a non-main thread, and that worker's own child, are the trainer's."""
    trainer = processes(
        "import subprocess, sys, threading, time\n"
        "grandchild = 'import subprocess, sys, time; "
        'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]); '
        "time.sleep(600)'\n"
        "def fork():\n"
        "    subprocess.Popen([sys.executable, '-c', grandchild])\n"
        "    time.sleep(600)  # alive: the worker stays this thread's child\n"
        "threading.Thread(target=fork, daemon=True).start()\n"
        "time.sleep(600)"
    )
    sampler = no_gpus(pids=lambda: [trainer.pid], children_scan_interval=0)
    wait_for(
        lambda: len(psutil.Process(trainer.pid).children(recursive=True)) == 2,
        30,
        "the worker and its child",
    )
    expected = {p.pid for p in psutil.Process(trainer.pid).children(recursive=True)}
    found = {p.pid for p in sampler._scan([psutil.Process(trainer.pid)])[trainer.pid]}
    assert found == expected
    assert line_of(sampler.sample(), trainer.pid)["children"] == 2  # type: ignore[index]


def test_gone_trainer_is_reported_once_and_dropped(processes: Any) -> None:
    """A trainer that exits is listed under `gone` in one sample only; a pid never seen too."""
    trainer = processes("import time; time.sleep(600)")
    missing = 2**22 + 12345  # above Linux's default pid_max: no such process
    sampler = no_gpus(pids=lambda: [trainer.pid, missing])
    first = sampler.sample()
    assert line_of(first, trainer.pid) is not None
    assert first["gone"] == [missing]
    os.killpg(trainer.pid, signal.SIGKILL)
    trainer.wait(10)
    second = sampler.sample()
    assert second["gone"] == [trainer.pid]
    assert second["processes"] == []
    third = sampler.sample()
    assert "gone" not in third and third["processes"] == []


def test_zombie_trainer_counts_as_gone(processes: Any) -> None:
    """A trainer that exited but is not reaped yet (a zombie) is gone, not a 0-byte line."""
    trainer = processes("import time; time.sleep(600)")
    sampler = no_gpus(pids=lambda: [trainer.pid])
    assert line_of(sampler.sample(), trainer.pid) is not None
    os.kill(trainer.pid, signal.SIGKILL)  # no wait(): it stays a zombie
    wait_for(lambda: psutil.Process(trainer.pid).status() == psutil.STATUS_ZOMBIE, 10, "a zombie")
    assert sampler.sample()["gone"] == [trainer.pid]
    assert "gone" not in sampler.sample()


def test_failing_pids_callable_is_counted_not_raised() -> None:
    """pids() raising gives a sample with no process lines and a counted error."""

    def broken() -> list[int]:
        raise RuntimeError("agent bug")

    sampler = no_gpus(pids=broken)
    entry = sampler.sample()
    assert entry["processes"] == []
    assert sampler.counters()["process_errors"] == 1


def test_bad_interval_is_refused() -> None:
    """A zero, negative or NaN interval is a ValueError that names the parameter."""
    for interval in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="interval"):
            no_gpus(interval=interval)


# -- the thread -----------------------------------------------------------------------------


def test_thread_emits_at_the_interval_and_close_joins() -> None:
    """start() emits at once and then every interval, never in bursts; close() joins in time."""
    emitted: list[float] = []
    sampler = SystemSampler(
        lambda entry: emitted.append(time.monotonic()), interval=0.05, nvml=None
    )
    started = time.monotonic()
    sampler.start()
    wait_for(lambda: len(emitted) >= 5, 10, "five samples")
    before = time.monotonic()
    assert sampler.close(2.0) is True
    assert time.monotonic() - before < 2.0
    elapsed = emitted[-1] - started
    assert len(emitted) <= elapsed / 0.05 + 2  # no more than the schedule allows
    assert not any(t.name == "outrider-system-sampler" for t in threading.enumerate())
    count = len(emitted)
    time.sleep(0.15)  # three intervals: a stopped sampler emits nothing more
    assert len(emitted) == count
    with pytest.raises(RuntimeError, match="close"):
        sampler.start()


def test_raising_emit_does_not_stop_the_sampler(caplog: pytest.LogCaptureFixture) -> None:
    """emit raising every time: sampling goes on, errors are counted and logged once a minute."""

    def emit(entry: dict[str, Any]) -> None:
        raise RuntimeError("sink queue exploded")

    sampler = SystemSampler(emit, interval=0.02, nvml=None)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        sampler.start()
        wait_for(lambda: sampler.counters()["emit_errors"] >= 5, 10, "five failed emits")
        assert sampler.close(2.0)
    counters = sampler.counters()
    assert counters["samples"] >= 5 and counters["sample_errors"] == 0
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "sink queue exploded" in warnings[0].getMessage()


def test_close_is_bounded_when_emit_hangs() -> None:
    """An emit that blocks: close(timeout) returns False after about timeout, not forever."""
    release = threading.Event()
    entered = threading.Event()

    def emit(entry: dict[str, Any]) -> None:
        entered.set()
        release.wait(30)

    sampler = SystemSampler(emit, interval=0.02, nvml=None)
    sampler.start()
    assert entered.wait(10)
    before = time.monotonic()
    assert sampler.close(0.2) is False
    assert time.monotonic() - before < 2.0
    release.set()
    thread = next(t for t in threading.enumerate() if t.name == "outrider-system-sampler")
    thread.join(10)
    assert not thread.is_alive()


# -- GPUs: NVML is faked (this machine has none) --------------------------------------------


class FakeDevice:
    def __init__(self, index: int, *, full: bool) -> None:
        self.index = index
        self.full = full  # False: an older GPU, most optional fields unsupported
        self.tx = 10_000_000
        self.rx = 50_000_000
        self.kib_per_s = {pynvml.NVML_PCIE_UTIL_TX_BYTES: 300, pynvml.NVML_PCIE_UTIL_RX_BYTES: 700}


class FakeNvml:
    """pynvml's API for two fake GPUs, raising pynvml's real NVMLError subclasses."""

    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_CLOCK_SM = pynvml.NVML_CLOCK_SM
    NVML_CLOCK_MEM = pynvml.NVML_CLOCK_MEM
    NVML_MEMORY_ERROR_TYPE_CORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_PCIE_UTIL_TX_BYTES = pynvml.NVML_PCIE_UTIL_TX_BYTES
    NVML_PCIE_UTIL_RX_BYTES = pynvml.NVML_PCIE_UTIL_RX_BYTES
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def __init__(self, init_error: pynvml.NVMLError | None = None) -> None:
        self.init_error = init_error
        self.devices = [FakeDevice(0, full=True), FakeDevice(1, full=False)]
        self.calls: dict[str, int] = {}
        self.events: list[Any] = []
        self.registered: list[int] = []
        self.initialized = 0

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _full_only(self, device: FakeDevice, name: str) -> None:
        self._count(name)
        if not device.full:
            raise pynvml.NVMLError_NotSupported()

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialized += 1

    def nvmlShutdown(self) -> None:
        self.initialized -= 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        return self.devices[index]

    def nvmlDeviceGetIndex(self, device: FakeDevice) -> int:
        return device.index

    def nvmlDeviceGetUUID(self, device: FakeDevice) -> str:
        return f"GPU-fake-{device.index}"

    def nvmlDeviceGetName(self, device: FakeDevice) -> bytes:
        return b"NVIDIA H100 80GB HBM3" if device.full else b"Tesla T4"

    def nvmlDeviceGetUtilizationRates(self, device: FakeDevice) -> Any:
        return pynvml.c_nvmlUtilization_t(gpu=87, memory=41)

    def nvmlDeviceGetMemoryInfo(self, device: FakeDevice) -> Any:
        return pynvml.c_nvmlMemory_t(total=80 << 30, free=30 << 30, used=50 << 30)

    def nvmlDeviceGetTemperature(self, device: FakeDevice, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return 61

    def nvmlDeviceGetPowerUsage(self, device: FakeDevice) -> int:
        self._full_only(device, "power")
        return 512_500  # mW

    def nvmlDeviceGetClockInfo(self, device: FakeDevice, clock: int) -> int:
        return {pynvml.NVML_CLOCK_SM: 1980, pynvml.NVML_CLOCK_MEM: 2619}[clock]

    def nvmlDeviceGetTotalEnergyConsumption(self, device: FakeDevice) -> int:
        self._full_only(device, "energy")
        return 7_000_000  # mJ

    def nvmlDeviceGetTotalEccErrors(self, device: FakeDevice, error: int, counter: int) -> int:
        self._full_only(device, "ecc")
        assert counter == pynvml.NVML_VOLATILE_ECC
        return 2 if error == pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED else 5

    def nvmlDeviceGetFieldValues(self, device: FakeDevice, ids: list[int]) -> Any:
        self._count("field_values")
        values = (pynvml.c_nvmlFieldValue_t * len(ids))()
        counters = {
            pynvml.NVML_FI_DEV_PCIE_COUNT_TX_BYTES: device.tx,
            pynvml.NVML_FI_DEV_PCIE_COUNT_RX_BYTES: device.rx,
        }
        for value, field_id in zip(values, ids, strict=True):
            value.fieldId = field_id
            if device.full:
                value.nvmlReturn = pynvml.NVML_SUCCESS
                value.valueType = pynvml.NVML_VALUE_TYPE_UNSIGNED_LONG_LONG
                value.value.ullVal = counters[field_id]
            else:
                value.nvmlReturn = pynvml.NVML_ERROR_NOT_SUPPORTED
        return values

    def nvmlDeviceGetPcieThroughput(self, device: FakeDevice, counter: int) -> int:
        self._count("pcie_throughput")
        return device.kib_per_s[counter]

    def nvmlEventSetCreate(self) -> str:
        return "event-set"

    def nvmlEventSetFree(self, event_set: str) -> None:
        pass

    def nvmlDeviceGetSupportedEventTypes(self, device: FakeDevice) -> int:
        self._full_only(device, "event_types")
        return int(pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeSingleBitEccError)

    def nvmlDeviceRegisterEvents(self, device: FakeDevice, types: int, event_set: str) -> None:
        assert types == pynvml.nvmlEventTypeXidCriticalError and event_set == "event-set"
        self.registered.append(device.index)

    def nvmlEventSetWait(self, event_set: str, timeout_ms: int) -> Any:
        assert timeout_ms == 0  # a sample never waits for an event
        if not self.events:
            raise pynvml.NVMLError_Timeout()
        return self.events.pop(0)


class Event:
    """What nvmlEventSetWait returns: device handle, event type and data."""

    def __init__(self, device: FakeDevice, event_type: int, data: int) -> None:
        self.device, self.eventType, self.eventData = device, event_type, data


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


# -- flatten ---------------------------------------------------------------------------------


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
