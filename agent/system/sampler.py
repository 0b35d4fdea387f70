"""Host, trainer-process and GPU samples: the ``system`` entries of the run store.

``SystemSampler`` samples every ``interval`` seconds (default 1) on its own
daemon thread and hands each sample to ``emit``; ``sinks.schema.flatten`` turns a sample
into the flat ``system/...`` names the alert engine, the dashboard and
TensorBoard use. The agent wires it in (which pids, where entries go); this
module only samples. See docs/system.md for every field and name.

What a sample costs (docs/performance.md gives figures): a few psutil calls for the
host fields, a few more per watched trainer. Finding the trainers' children walks
``/proc/<pid>/task/<tid>/children`` (the whole process table where that file is
missing) every ``children_scan_interval`` seconds, not every sample. GPU fields
are about a dozen NVML calls per GPU; the PCIe fallback for GPUs without byte
counters blocks 20 ms per call in the driver (NVML measures over a 20 ms window).

Rates (disk, network, PCIe, CPU percentages) are deltas of counters between
two samples, so the first sample has none. ``cpu_percent`` is computed from
CPU-time counters as ``psutil.cpu_percent(interval=None)`` does, with the
sampler's own priming, so other users of psutil in the agent do not disturb it.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

from sinks import schema

logger = logging.getLogger("outrider.agent.system")

KIND = schema.SYSTEM
DEFAULT_INTERVAL_SECONDS = 1.0
#: the same failure is logged at most this often; every one is counted
ERROR_LOG_INTERVAL_SECONDS = 60.0
#: XID events read per sample at most (the rest wait for the next sample)
MAX_XID_EVENTS_PER_SAMPLE = 64
#: how often the process table is scanned for the trainers' children (a new trainer: at once)
CHILDREN_SCAN_INTERVAL_SECONDS = 5.0
#: network interfaces left out of the network rates: loopback is the agent's own traffic
LOOPBACK_INTERFACES = frozenset({"lo", "lo0"})

# NVML error codes (nvml.h): the ones that say "this GPU or driver cannot do that".
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_SUCCESS = 0
_UNSUPPORTED = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND})
# NVML field ids (nvml.h): PCIe byte counters, read with nvmlDeviceGetFieldValues.
NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 197
NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 198

_LOAD_PYNVML: Any = object()  # the default for ``nvml``: import pynvml on the first sample


@dataclass
class _Trainer:
    """A watched trainer pid, and its process tree's CPU time at the last sample."""

    process: Any  # psutil.Process
    name: str
    cpu_seconds: float | None = None
    at: float = 0.0


@dataclass
class _Gpu:
    """One GPU's handle, static identity, and the state its rates and fallbacks need."""

    index: int
    handle: Any
    uuid: str | None = None
    name: str | None = None
    unsupported: set[str] = field(default_factory=set)  # fields NVML said it cannot give
    pcie_counters: bool = True  # False: the sampled-throughput fallback
    pcie_last: tuple[float, int, int] | None = None  # (clock, tx bytes, rx bytes)
    xid: int | None = None  # last XID seen; None: XID events not available


class SystemSampler:
    """Samples the host, the trainer processes and the GPUs; hands each sample to ``emit``.

    ``pids()`` names the trainer processes to watch (the agent passes the
    local ranks' pids); it is called at every sample. Each trainer's line
    sums the trainer and all its descendants (DataLoader workers, compile
    workers): ``cpu_percent`` is their CPU time over the interval (100 = one
    core busy; children that exited are counted through the CPU time their
    parent collected when it reaped them), ``rss_bytes`` the sum of their
    resident memory (pages shared between a trainer and its forked workers are
    counted in each), ``threads`` the sum of their threads, ``children`` how
    many descendants were alive. A trainer that has exited is dropped and its
    pid is listed once under ``gone``. Children are found by a scan of the
    process table every ``children_scan_interval`` seconds (and at once for a
    new trainer); between scans the known ones are measured.

    GPU fields come from NVML: ``nvml`` is the pynvml module (the default
    imports it on the first sample), or None for no GPU metrics. Without a
    driver or GPU, one info line says so, and samples have no ``gpus`` key.
    Each NVML call is guarded on its own: a field the GPU does not support is
    absent (and not asked again); other NVML errors are counted and logged at
    most once a minute.

    ``emit`` runs on the sampler's thread; whatever it raises is caught,
    counted (``counters()["emit_errors"]``) and logged at most once a minute.
    ``clock`` is a monotonic clock, for rates and the sampling schedule; the
    entry's ``t`` is always ``time.time()``.
    """

    def __init__(
        self,
        emit: Callable[[dict[str, Any]], object],
        *,
        interval: float = DEFAULT_INTERVAL_SECONDS,
        pids: Callable[[], Iterable[int]] = lambda: (),
        clock: Callable[[], float] = time.monotonic,
        nvml: Any = _LOAD_PYNVML,
        host: str | None = None,
        children_scan_interval: float = CHILDREN_SCAN_INTERVAL_SECONDS,
    ) -> None:
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
            raise ValueError(
                f"SystemSampler: interval must be a number of seconds > 0, not {interval!r}"
            )
        self.interval = float(interval)
        self.host = host if host is not None else socket.gethostname()
        self._emit = emit
        self._pids = pids
        self._clock = clock
        self._nvml_arg = nvml
        self._lock = threading.Lock()  # one sample at a time (the thread, or a direct call)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._counts = {
            "samples": 0,
            "sample_errors": 0,
            "emit_errors": 0,
            "nvml_errors": 0,
            "process_errors": 0,
        }
        self._logged_at: dict[str, float] = {}
        self._cpu_count = psutil.cpu_count() or 0
        # host counters at the last sample: (clock, value)
        self._cpu_last: tuple[float, float] | None = None  # (total, busy) CPU seconds
        self._disk_last: tuple[float, int, int] | None = None
        self._net_last: tuple[float, int, int] | None = None
        self._trainers: dict[int, _Trainer] = {}
        self._gone: dict[int, float | None] = {}  # pid -> create time of the process that went
        self._children_scan_interval = children_scan_interval
        self._descendants: dict[int, list[Any]] = {}  # trainer pid -> psutil.Processes, last scan
        self._scanned_at: float | None = None
        self._nvml: Any = None
        self._nvml_started = False
        self._gpus: list[_Gpu] = []
        self._event_set: Any = None

    # -- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start sampling on a daemon thread: a first sample at once, then every ``interval``."""
        if self._closed:
            raise RuntimeError("SystemSampler: start() after close(); make a new sampler")
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._run, name="outrider-system-sampler", daemon=True
        )
        self._thread.start()

    def close(self, timeout: float = 5.0) -> bool:
        """Stop the thread and wait for it at most ``timeout`` s; True when it has stopped.

        NVML is shut down only once the thread has stopped (a thread still
        inside a slow NVML call keeps it; it is a daemon thread).
        """
        self._closed = True
        self._nvml_started = True  # a sample() after close() must not start NVML again
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.warning(
                    "outrider system sampler: still sampling %.1f s after close(); left running",
                    timeout,
                )
                return False
        if self._lock.acquire(timeout=max(timeout, 0.0)):
            try:
                self._shutdown_nvml()
            finally:
                self._lock.release()
        return True

    def counters(self) -> dict[str, int]:
        """Samples taken and errors counted (emit, sample, NVML, reading a process)."""
        return dict(self._counts)

    def _run(self) -> None:
        next_at = self._clock()
        while not self._stop.is_set():
            self._tick()
            next_at += self.interval
            now = self._clock()
            if next_at < now:  # a sample took longer than the interval: skip, do not burst
                next_at = now
            if self._stop.wait(min(next_at - now, self.interval)):
                return

    def _tick(self) -> None:
        try:
            entry = self.sample()
        except Exception as exc:  # a bug or an OS surprise must not end the sampling
            self._error("sample_errors", "a sample failed: %r", exc)
            return
        try:
            self._emit(entry)
        except Exception as exc:  # emit is the agent's; its failures are its own
            self._error("emit_errors", "emit raised %r", exc)

    def _error(self, counter: str, message: str, *args: object) -> None:
        self._counts[counter] += 1
        now = time.monotonic()
        last = self._logged_at.get(counter)
        if last is None or now - last >= ERROR_LOG_INTERVAL_SECONDS:
            self._logged_at[counter] = now
            logger.warning(
                "outrider system sampler: " + message + " (%d so far)", *args, self._counts[counter]
            )

    # -- one sample ------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """One synchronous sample: what the thread emits every ``interval`` seconds."""
        with self._lock:
            now = self._clock()
            entry: dict[str, Any] = {"kind": KIND, "host": self.host, "t": time.time()}
            self._host_sample(entry, now)
            processes, gone = self._processes(now)
            entry["processes"] = processes
            if gone:
                entry["gone"] = gone
            if not self._nvml_started:
                self._nvml_started = True
                self._start_nvml()
            if self._gpus:
                self._drain_xid_events()
                entry["gpus"] = [self._gpu_sample(gpu, now) for gpu in self._gpus]
            self._counts["samples"] += 1
            return entry

    def _host_sample(self, entry: dict[str, Any], now: float) -> None:
        times = psutil.cpu_times()
        total = sum(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
        busy = total - times.idle - getattr(times, "iowait", 0.0)
        if self._cpu_last is not None:
            elapsed = total - self._cpu_last[0]
            if elapsed > 0:
                share = (busy - self._cpu_last[1]) / elapsed
                entry["cpu_percent"] = round(min(max(share, 0.0), 1.0) * 100.0, 2)
        self._cpu_last = (total, busy)
        entry["cpu_count"] = self._cpu_count
        entry["load1"] = psutil.getloadavg()[0]
        memory = psutil.virtual_memory()
        entry["memory_used_bytes"] = int(memory.used)
        entry["memory_total_bytes"] = int(memory.total)
        entry["memory_available_bytes"] = int(memory.available)
        entry["swap_used_bytes"] = int(psutil.swap_memory().used)
        disk = psutil.disk_io_counters()  # None where the OS has no disk counters
        if disk is not None:
            read, written = int(disk.read_bytes), int(disk.write_bytes)
            self._rates(
                entry,
                "disk_read_bytes_per_s",
                "disk_write_bytes_per_s",
                self._disk_last,
                now,
                read,
                written,
            )
            self._disk_last = (now, read, written)
        else:
            self._disk_last = None
        nics = psutil.net_io_counters(pernic=True) or {}
        received = sum(c.bytes_recv for n, c in nics.items() if n not in LOOPBACK_INTERFACES)
        sent = sum(c.bytes_sent for n, c in nics.items() if n not in LOOPBACK_INTERFACES)
        self._rates(
            entry,
            "net_recv_bytes_per_s",
            "net_sent_bytes_per_s",
            self._net_last,
            now,
            received,
            sent,
        )
        self._net_last = (now, received, sent)

    @staticmethod
    def _rates(
        entry: dict[str, Any],
        key_a: str,
        key_b: str,
        last: tuple[float, int, int] | None,
        now: float,
        a: int,
        b: int,
    ) -> None:
        """Per-second rates of two counters since ``last``; nothing on a first or reset count."""
        if last is None or now <= last[0]:
            return
        elapsed = now - last[0]
        if a >= last[1]:
            entry[key_a] = (a - last[1]) / elapsed
        if b >= last[2]:
            entry[key_b] = (b - last[2]) / elapsed

    # -- trainer processes ------------------------------------------------------------
    def _processes(self, now: float) -> tuple[list[dict[str, Any]], list[int]]:
        try:
            wanted = sorted({int(pid) for pid in self._pids()})
        except Exception as exc:  # the agent's callable; its bug is not a sampler crash
            self._error("process_errors", "pids() raised %r", exc)
            return [], []
        for pid in [p for p in self._trainers if p not in wanted]:
            del self._trainers[pid]  # no longer the agent's concern
        self._gone = {pid: t for pid, t in self._gone.items() if pid in wanted}
        gone: list[int] = []
        live: list[_Trainer] = []
        for pid in wanted:
            trainer = self._trainers.get(pid) or self._watch(pid, gone)
            if trainer is None:
                continue
            if self._alive(trainer):
                live.append(trainer)
            else:
                del self._trainers[pid]
                self._gone[pid] = _create_time(trainer.process)
                gone.append(pid)
        if not live:
            self._descendants, self._scanned_at = {}, None
            return [], gone
        if (
            self._scanned_at is None
            or now - self._scanned_at >= self._children_scan_interval
            or any(t.process.pid not in self._descendants for t in live)
        ):
            self._descendants = self._scan([t.process for t in live])
            self._scanned_at = now
        lines = [
            self._measure(trainer, self._descendants.get(trainer.process.pid, []), now)
            for trainer in live
        ]
        return [line for line in lines if line is not None], gone

    def _watch(self, pid: int, gone: list[int]) -> _Trainer | None:
        """Start watching ``pid``; None (and listed in ``gone`` once) when it does not run."""
        try:
            process = psutil.Process(pid)
            if pid in self._gone and process.create_time() == self._gone[pid]:
                return None  # the same dead process, already reported
            name = process.name()
        except psutil.NoSuchProcess:
            if pid not in self._gone:
                self._gone[pid] = None
                gone.append(pid)
            return None
        except psutil.Error as exc:  # AccessDenied: another user's process
            self._error("process_errors", "cannot watch pid %d: %r", pid, exc)
            return None
        self._gone.pop(pid, None)
        trainer = self._trainers[pid] = _Trainer(process, name)
        return trainer

    @staticmethod
    def _alive(trainer: _Trainer) -> bool:
        try:
            # is_running() also catches a pid reused by another process
            running = bool(trainer.process.is_running())
            return running and trainer.process.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _scan(self, trainers: list[Any]) -> dict[int, list[Any]]:
        """Each trainer's descendants (DataLoader workers and theirs).

        Linux lists each thread's children in ``/proc/<pid>/task/<tid>/children``,
        so the walk reads a file per thread of the trainer and of each descendant
        (a few dozen on a trainer with workers), however many processes the host
        runs. Without those files (a kernel built without them, another OS) the
        fallback reads every process's ``/proc/<pid>/stat`` (about 20 us each).
        Either way the scan runs every ``children_scan_interval`` seconds, not
        every sample: a worker started in between is counted from the next scan
        (with the CPU time it used since it started); one that exits drops out at once.
        """
        known = {p.pid: p for kids in self._descendants.values() for p in kids}
        walk = _proc_descendants if _PROC_CHILDREN else _ppid_walker()
        result: dict[int, list[Any]] = {}
        for trainer in trainers:
            found: list[Any] = []
            for pid in walk(trainer.pid):
                process = known.get(pid)
                if process is None:
                    try:
                        process = psutil.Process(pid)
                    except psutil.Error:
                        continue
                found.append(process)
            result[trainer.pid] = found
        return result

    def _measure(self, trainer: _Trainer, children: list[Any], now: float) -> dict[str, Any] | None:
        try:
            cpu, rss, threads = _usage(trainer.process)
        except psutil.Error:
            return None  # it went between the check and now; reported gone next sample
        alive = 0
        for child in children:
            try:
                child_cpu, child_rss, child_threads = _usage(child)
            except psutil.Error:  # exited meanwhile: its time reaches the parent when reaped
                continue
            cpu += child_cpu
            rss += child_rss
            threads += child_threads
            alive += 1
        line: dict[str, Any] = {"pid": trainer.process.pid, "name": trainer.name}
        if trainer.cpu_seconds is not None and now > trainer.at:
            share = max(cpu - trainer.cpu_seconds, 0.0) / (now - trainer.at)
            line["cpu_percent"] = round(share * 100.0, 2)
        trainer.cpu_seconds, trainer.at = cpu, now
        line["rss_bytes"] = rss
        line["threads"] = threads
        line["children"] = alive
        return line

    # -- GPUs ---------------------------------------------------------------------------
    def _start_nvml(self) -> None:
        nvml = self._nvml_arg
        if nvml is _LOAD_PYNVML:
            try:
                import pynvml

                nvml = pynvml
            except ImportError as exc:
                self._gpus_off(f"pynvml is not installed: {exc}")
                return
        if nvml is None:
            self._gpus_off("no NVML module given")
            return
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError (no driver, no library) or a broken install
            self._gpus_off(f"{type(exc).__name__}: {exc}")
            return
        self._nvml = nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._shutdown_nvml()
            self._gpus_off(f"NVML cannot count GPUs: {type(exc).__name__}: {exc}")
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:  # e.g. a GPU this container may not see
                self._error("nvml_errors", "GPU %d: no handle: %s", index, exc)
                continue
            gpu = _Gpu(index, handle)
            uuid = self._call(gpu, "uuid", nvml.nvmlDeviceGetUUID, handle)
            name = self._call(gpu, "name", nvml.nvmlDeviceGetName, handle)
            gpu.uuid = _text(uuid) if uuid is not None else None
            gpu.name = _text(name) if name is not None else None
            self._gpus.append(gpu)
        if not self._gpus:
            self._shutdown_nvml()
            self._gpus_off(f"NVML sees {count} GPU(s) and none can be read")
            return
        self._register_xid_events()
        logger.info("outrider system sampler: sampling %d GPU(s) through NVML", len(self._gpus))

    @staticmethod
    def _gpus_off(reason: str) -> None:
        logger.info("outrider system sampler: no NVIDIA GPU/driver: GPU metrics off (%s)", reason)

    def _shutdown_nvml(self) -> None:
        nvml, self._nvml = self._nvml, None
        self._gpus = []
        if nvml is None:
            return
        try:
            if self._event_set is not None:
                nvml.nvmlEventSetFree(self._event_set)
            nvml.nvmlShutdown()
        except Exception as exc:
            logger.debug("outrider system sampler: NVML shutdown: %r", exc)
        self._event_set = None

    def _call(self, gpu: _Gpu, key: str, function: Callable[..., Any], *args: Any) -> Any:
        """One NVML call; None when unsupported (not asked again) or failing (counted)."""
        if key in gpu.unsupported:
            return None
        try:
            return function(*args)
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) in _UNSUPPORTED:
                gpu.unsupported.add(key)
            else:
                self._error("nvml_errors", "GPU %d: %s: %s", gpu.index, key, exc)
            return None

    def _gpu_sample(self, gpu: _Gpu, now: float) -> dict[str, Any]:
        nvml, handle = self._nvml, gpu.handle
        line: dict[str, Any] = {"index": gpu.index}
        if gpu.uuid is not None:
            line["uuid"] = gpu.uuid
        if gpu.name is not None:
            line["name"] = gpu.name
        utilization = self._call(gpu, "utilization", nvml.nvmlDeviceGetUtilizationRates, handle)
        if utilization is not None:
            line["util_percent"] = float(utilization.gpu)
            line["memory_util_percent"] = float(utilization.memory)
        memory = self._call(gpu, "memory", nvml.nvmlDeviceGetMemoryInfo, handle)
        if memory is not None:
            line["memory_used_bytes"] = int(memory.used)
            line["memory_free_bytes"] = int(memory.free)
            line["memory_total_bytes"] = int(memory.total)
        calls: tuple[tuple[str, Callable[..., Any], tuple[Any, ...], float], ...] = (
            ("temperature_c", nvml.nvmlDeviceGetTemperature, (nvml.NVML_TEMPERATURE_GPU,), 1.0),
            ("power_watts", nvml.nvmlDeviceGetPowerUsage, (), 1e-3),  # mW
            ("sm_clock_mhz", nvml.nvmlDeviceGetClockInfo, (nvml.NVML_CLOCK_SM,), 1.0),
            ("mem_clock_mhz", nvml.nvmlDeviceGetClockInfo, (nvml.NVML_CLOCK_MEM,), 1.0),
            ("energy_joules", nvml.nvmlDeviceGetTotalEnergyConsumption, (), 1e-3),  # mJ
        )
        for key, function, args, factor in calls:
            value = self._call(gpu, key, function, handle, *args)
            if value is not None:
                line[key] = value * factor if factor != 1.0 else float(value)
        for key, error_type in (
            ("ecc_dbe_volatile_total", nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED),
            ("ecc_sbe_volatile_total", nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED),
        ):
            count = self._call(
                gpu,
                key,
                nvml.nvmlDeviceGetTotalEccErrors,
                handle,
                error_type,
                nvml.NVML_VOLATILE_ECC,
            )
            if count is not None:
                line[key] = int(count)
        self._pcie(gpu, line, now)
        if gpu.xid is not None:
            line["xid_errors"] = gpu.xid
        return line

    def _pcie(self, gpu: _Gpu, line: dict[str, Any], now: float) -> None:
        """PCIe bytes/s: from NVML's byte counters, else its 20 ms sampled throughput."""
        nvml, handle = self._nvml, gpu.handle
        if gpu.pcie_counters:
            ids = [NVML_FI_DEV_PCIE_COUNT_TX_BYTES, NVML_FI_DEV_PCIE_COUNT_RX_BYTES]
            values = self._call(gpu, "pcie_counters", nvml.nvmlDeviceGetFieldValues, handle, ids)
            if values is not None and all(v.nvmlReturn == NVML_SUCCESS for v in values):
                tx, rx = int(values[0].value.ullVal), int(values[1].value.ullVal)
                self._rates(
                    line, "pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s", gpu.pcie_last, now, tx, rx
                )
                gpu.pcie_last = (now, tx, rx)
                return
            if values is None and "pcie_counters" not in gpu.unsupported:
                return  # a passing error, counted: try the counters again next time
            gpu.pcie_counters = False  # the driver or GPU has no counters: fall back for good
        for key, counter in (
            ("pcie_tx_bytes_per_s", nvml.NVML_PCIE_UTIL_TX_BYTES),
            ("pcie_rx_bytes_per_s", nvml.NVML_PCIE_UTIL_RX_BYTES),
        ):
            kib_per_s = self._call(gpu, key, nvml.nvmlDeviceGetPcieThroughput, handle, counter)
            if kib_per_s is not None:
                line[key] = float(kib_per_s) * 1024.0

    def _register_xid_events(self) -> None:
        """XIDs reach NVML clients only as events: register for them once, read them per sample.

        A GPU that cannot deliver XID events has no ``xid_errors`` field; one
        that can reports the last XID seen since the sampler started (0: none),
        which is what DCGM_FI_DEV_XID_ERRORS means too.
        """
        nvml = self._nvml
        xid = nvml.nvmlEventTypeXidCriticalError
        try:
            self._event_set = nvml.nvmlEventSetCreate()
        except nvml.NVMLError as exc:
            logger.info("outrider system sampler: no XID events (%s)", exc)
            return
        for gpu in self._gpus:
            try:
                if int(nvml.nvmlDeviceGetSupportedEventTypes(gpu.handle)) & xid:
                    nvml.nvmlDeviceRegisterEvents(gpu.handle, xid, self._event_set)
                    gpu.xid = 0
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) not in _UNSUPPORTED:
                    self._error("nvml_errors", "GPU %d: XID events: %s", gpu.index, exc)
        if all(gpu.xid is None for gpu in self._gpus):
            try:
                nvml.nvmlEventSetFree(self._event_set)
            except nvml.NVMLError as exc:
                logger.debug("outrider system sampler: freeing the event set: %s", exc)
            self._event_set = None

    def _drain_xid_events(self) -> None:
        if self._event_set is None:
            return
        nvml = self._nvml
        by_index = {gpu.index: gpu for gpu in self._gpus}
        for _ in range(MAX_XID_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait(self._event_set, 0)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) != NVML_ERROR_TIMEOUT:  # timeout: no event waiting
                    self._error("nvml_errors", "reading XID events: %s", exc)
                return
            if not int(event.eventType) & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                gpu = by_index.get(int(nvml.nvmlDeviceGetIndex(event.device)))
            except nvml.NVMLError as exc:
                self._error("nvml_errors", "XID event from an unknown GPU: %s", exc)
                continue
            if gpu is not None:
                gpu.xid = int(event.eventData)
                logger.warning(
                    "outrider system sampler: GPU %d (%s) reported XID %d",
                    gpu.index,
                    gpu.uuid,
                    gpu.xid,
                )


def _usage(process: Any) -> tuple[float, int, int]:
    """(CPU seconds, RSS bytes, threads) of one process; CPU includes its reaped children's."""
    with process.oneshot():
        times = process.cpu_times()
        cpu = times.user + times.system
        cpu += getattr(times, "children_user", 0.0) + getattr(times, "children_system", 0.0)
        return cpu, int(process.memory_info().rss), int(process.num_threads())


#: whether this kernel lists each thread's children under /proc (CONFIG_PROC_CHILDREN)
_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _proc_descendants(root: int) -> list[int]:
    """Every descendant of ``root``, walked through ``/proc/<pid>/task/<tid>/children``.

    A process or thread that exits during the walk is skipped: it has no descendants
    left to count, and the next scan sees the tree as it is then.
    """
    found: list[int] = []
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as listing:
                    children = [int(child) for child in listing.read().split()]
            except OSError:
                continue
            found.extend(children)
            frontier.extend(children)
    return found


def _ppid_walker() -> Callable[[int], list[int]]:
    """Descendants from one scan of the whole process table, shared by every trainer."""
    by_parent: dict[int, list[int]] = {}
    for process in psutil.process_iter(["ppid"]):
        by_parent.setdefault(process.info["ppid"], []).append(process.pid)

    def walk(root: int) -> list[int]:
        found: list[int] = []
        stack = list(by_parent.get(root, ()))
        while stack:
            pid = stack.pop()
            found.append(pid)
            stack.extend(by_parent.get(pid, ()))
        return found

    return walk


def _create_time(process: Any) -> float | None:
    try:
        return float(process.create_time())
    except psutil.Error:
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
