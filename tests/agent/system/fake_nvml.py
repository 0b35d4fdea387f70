"""pynvml's API for two fake GPUs (an H100 with every field, a T4 with few), raising
pynvml's real NVMLError subclasses: the faults no machine here can produce on demand."""

from __future__ import annotations

from typing import Any

import pynvml


class FakeDevice:
    """One fake GPU: its index, whether it has the optional fields, its PCIe counters."""

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
