"""Host, trainer-process and GPU figures: the ``system`` entries of the run store.

``SystemSampler`` samples every ``interval`` seconds (default 1) on its own
daemon thread and hands each sample to ``emit``; ``sinks.schema.flatten``
turns a sample into the flat ``system/...`` names the alert engine, the
dashboard and TensorBoard use. The agent wires it in (which pids, where
entries go); this room only samples: ``host.py``, ``processes.py`` and
``nvml.py`` each write their part of the entry. See docs/system.md for every
field and name.

Rates (disk, network, PCIe, CPU percentages) are deltas of counters between
two samples, so the first sample has none.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.system.errors import SamplerErrors, logger
from agent.system.host import HostSampler
from agent.system.nvml import LOAD_PYNVML, GpuSampler
from agent.system.processes import CHILDREN_SCAN_INTERVAL_SECONDS, TrainerProcesses
from probe.identity import host_name
from sinks import schema

DEFAULT_INTERVAL_SECONDS = 1.0


class SystemSampler:
    """Samples the host, the trainer processes and the GPUs; hands each sample to ``emit``.

    ``pids()`` names the trainer processes to watch; each one's line covers
    it and its descendants (``processes.TrainerProcesses``), found by a scan
    every ``children_scan_interval`` seconds. ``nvml`` is the pynvml module
    (the default imports it on the first sample), or None for no GPU metrics
    (``nvml.GpuSampler``).

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
        nvml: Any = LOAD_PYNVML,
        host: str | None = None,
        children_scan_interval: float = CHILDREN_SCAN_INTERVAL_SECONDS,
    ) -> None:
        if not (isinstance(interval, int | float) and math.isfinite(interval) and interval > 0):
            raise ValueError(
                f"SystemSampler: interval must be a number of seconds > 0, not {interval!r}"
            )
        self.interval = float(interval)
        self.host = host if host is not None else host_name()
        self._emit = emit
        self._clock = clock
        self._lock = threading.Lock()  # one sample at a time (the thread, or a direct call)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._samples = 0
        self._errors = SamplerErrors()
        self._host_fields = HostSampler()
        self._trainers = TrainerProcesses(pids, self._errors, children_scan_interval)
        self._gpus = GpuSampler(nvml, self._errors)

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
        self._gpus.retire()
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
                self._gpus.shutdown()
            finally:
                self._lock.release()
        return True

    def counters(self) -> dict[str, int]:
        """Samples taken and errors counted (sample, emit, NVML, reading a process)."""
        return {"samples": self._samples, **self._errors.counts}

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
            self._errors.count("sample_errors", "a sample failed: %r", exc)
            return
        try:
            self._emit(entry)
        except Exception as exc:  # emit is the agent's; its failures are its own
            self._errors.count("emit_errors", "emit raised %r", exc)

    # -- one sample ------------------------------------------------------------------
    def sample(self) -> dict[str, Any]:
        """One synchronous sample: what the thread emits every ``interval`` seconds."""
        with self._lock:
            now = self._clock()
            entry: dict[str, Any] = {"kind": schema.SYSTEM, "host": self.host, "t": time.time()}
            self._host_fields.sample(entry, now)
            processes, gone = self._trainers.sample(now)
            entry["processes"] = processes
            if gone:
                entry["gone"] = gone
            gpus = self._gpus.sample(now)
            if gpus:
                entry["gpus"] = gpus
            self._samples += 1
            return entry
