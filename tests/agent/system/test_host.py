"""The host fields of a sample, read on this real host: CPU, load, memory, disk and network."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest

from tests.agent.system.support import MB, FakeClock, no_gpus


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
