"""NVIDIA GPUs through NVML (pynvml): one line per GPU, each field asked on its own.

About a dozen NVML calls a GPU a sample. A field the GPU or driver cannot
give is left out and not asked again; any other NVML error leaves it out of
that one sample and is counted. The PCIe fallback for GPUs without byte
counters blocks 20 ms a call in the driver (NVML measures over a 20 ms
window). ``nvml`` is the pynvml module, or any object with its API (tests
pass a fake one).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.system.errors import SamplerErrors, logger
from agent.system.rates import CounterRates

# NVML error codes (nvml.h): the ones that say "this GPU or driver cannot do that".
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_SUCCESS = 0
_UNSUPPORTED = frozenset({NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_FUNCTION_NOT_FOUND})
# NVML field ids (nvml.h): PCIe byte counters, read with nvmlDeviceGetFieldValues.
NVML_FI_DEV_PCIE_COUNT_TX_BYTES = 197
NVML_FI_DEV_PCIE_COUNT_RX_BYTES = 198
#: XID events read per sample at most (the rest wait for the next sample)
MAX_XID_EVENTS_PER_SAMPLE = 64

#: the default ``nvml``: import pynvml on the first sample
LOAD_PYNVML: Any = object()


@dataclass
class _Gpu:
    """One GPU's handle, static identity, and the state its rates and fallbacks need."""

    index: int
    handle: Any
    uuid: str | None = None
    name: str | None = None
    unsupported: set[str] = field(default_factory=set)  # fields NVML said it cannot give
    pcie_counters: bool = True  # False: the sampled-throughput fallback
    pcie: CounterRates = field(
        default_factory=lambda: CounterRates("pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s")
    )
    xid: int | None = None  # last XID seen; None: XID events not available


class GpuSampler:
    """The ``gpus`` lines of a sample; NVML starts on the first sample, stops at ``shutdown()``.

    Without pynvml, a driver or a GPU (or with ``nvml=None``), one info line
    says so and there are no GPU lines.
    """

    def __init__(self, nvml: Any, errors: SamplerErrors) -> None:
        self._nvml_arg = nvml
        self._errors = errors
        self._nvml: Any = None
        self._started = False
        self._gpus: list[_Gpu] = []
        self._event_set: Any = None

    def sample(self, now: float) -> list[dict[str, Any]]:
        """One line per GPU; empty when there is none to read."""
        if not self._started:
            self._started = True
            self._start()
        if not self._gpus:
            return []
        self._drain_xid_events()
        return [self._gpu_sample(gpu, now) for gpu in self._gpus]

    def retire(self) -> None:
        """Never start NVML from now on (a sample after the sampler's close must not)."""
        self._started = True

    def shutdown(self) -> None:
        """Free the event set and shut NVML down, if it was started."""
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

    def _start(self) -> None:
        nvml = self._nvml_arg
        if nvml is LOAD_PYNVML:
            try:
                import pynvml

                nvml = pynvml
            except ImportError as exc:
                _gpus_off(f"pynvml is not installed: {exc}")
                return
        if nvml is None:
            _gpus_off("no NVML module given")
            return
        try:
            nvml.nvmlInit()
        except Exception as exc:  # NVMLError (no driver, no library) or a broken install
            _gpus_off(f"{type(exc).__name__}: {exc}")
            return
        self._nvml = nvml
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self.shutdown()
            _gpus_off(f"NVML cannot count GPUs: {type(exc).__name__}: {exc}")
            return
        for index in range(count):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
            except nvml.NVMLError as exc:  # e.g. a GPU this container may not see
                self._errors.count("nvml_errors", "GPU %d: no handle: %s", index, exc)
                continue
            gpu = _Gpu(index, handle)
            uuid = self._call(gpu, "uuid", nvml.nvmlDeviceGetUUID, handle)
            name = self._call(gpu, "name", nvml.nvmlDeviceGetName, handle)
            gpu.uuid = _text(uuid) if uuid is not None else None
            gpu.name = _text(name) if name is not None else None
            self._gpus.append(gpu)
        if not self._gpus:
            self.shutdown()
            _gpus_off(f"NVML sees {count} GPU(s) and none can be read")
            return
        self._register_xid_events()
        logger.info("outrider system sampler: sampling %d GPU(s) through NVML", len(self._gpus))

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
                self._errors.count("nvml_errors", "GPU %d: %s: %s", gpu.index, key, exc)
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
                gpu.pcie.read(line, now, int(values[0].value.ullVal), int(values[1].value.ullVal))
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
                    self._errors.count("nvml_errors", "GPU %d: XID events: %s", gpu.index, exc)
        if all(gpu.xid is None for gpu in self._gpus):
            try:
                nvml.nvmlEventSetFree(self._event_set)
            except nvml.NVMLError as exc:
                logger.debug("outrider system sampler: freeing the event set: %s", exc)
            self._event_set = None

    def _drain_xid_events(self) -> None:
        """Read the XID events waiting in the event set, without waiting for one."""
        if self._event_set is None:
            return
        nvml = self._nvml
        by_index = {gpu.index: gpu for gpu in self._gpus}
        for _ in range(MAX_XID_EVENTS_PER_SAMPLE):
            try:
                event = nvml.nvmlEventSetWait(self._event_set, 0)
            except nvml.NVMLError as exc:
                if getattr(exc, "value", None) != NVML_ERROR_TIMEOUT:  # timeout: no event waiting
                    self._errors.count("nvml_errors", "reading XID events: %s", exc)
                return
            if not int(event.eventType) & nvml.nvmlEventTypeXidCriticalError:
                continue
            try:
                gpu = by_index.get(int(nvml.nvmlDeviceGetIndex(event.device)))
            except nvml.NVMLError as exc:
                self._errors.count("nvml_errors", "XID event from an unknown GPU: %s", exc)
                continue
            if gpu is not None:
                gpu.xid = int(event.eventData)
                logger.warning(
                    "outrider system sampler: GPU %d (%s) reported XID %d",
                    gpu.index,
                    gpu.uuid,
                    gpu.xid,
                )


def _gpus_off(reason: str) -> None:
    logger.info("outrider system sampler: no NVIDIA GPU/driver: GPU metrics off (%s)", reason)


def _text(value: Any) -> str:
    """NVML's strings: bytes from older pynvml releases, str from newer ones."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
