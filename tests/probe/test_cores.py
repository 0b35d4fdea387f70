"""The load of the trainer's cores, as the probe's sender reads it (probe/cores.py)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from probe.cores import CoreLoad
from tests.helpers import every_core_busy


def _write_stat(path: Path, cores: dict[int, tuple[int, int]]) -> None:
    """A /proc/stat with each core's (idle, busy) ticks, their sum first, then other lines."""
    idle, busy = sum(i for i, _ in cores.values()), sum(b for _, b in cores.values())
    lines = [f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0"]
    lines += [f"cpu{n} {b} 0 0 {i} 0 0 0 0 0 0" for n, (i, b) in cores.items()]
    lines += ["intr 123 1 2 3", "ctxt 456", "cpu9 never read: past the cores"]
    path.write_text("\n".join(lines) + "\n")


def test_idle_cores_are_counted_between_readings_with_hysteresis(tmp_path: Path) -> None:
    """Idle cores are the idle share of the trainer's cores' ticks since the last reading
    times their count; under half a core idle is busy, over three quarters quiet again,
    between them the state holds. Cores the trainer may not run on are not counted."""
    stat = tmp_path / "stat"
    load = CoreLoad(str(stat), cpus=frozenset({0, 2}))

    def reading(idle0: int, idle2: int, elapsed: int, other_idle: int = 0) -> bool:
        _write_stat(
            stat, {0: (idle0, elapsed - idle0), 1: (other_idle, 0), 2: (idle2, elapsed - idle2)}
        )
        return load.update()

    assert reading(0, 0, 0) is False and load.idle_cores is None  # one reading: nothing yet
    assert reading(5, 5, 100, other_idle=100) is True  # 0.1 of 2 cores idle; core 1 idle
    assert load.idle_cores == pytest.approx(0.1)
    assert reading(5 + 30, 5 + 30, 200) is True  # 0.6 idle: between the thresholds
    assert reading(35 + 50, 35 + 50, 300) is False  # 1.0 idle
    assert reading(85 + 30, 85 + 30, 400) is False  # 0.6 again: still quiet
    assert reading(115, 115, 400) is False  # no tick since: the state holds
    assert load.idle_cores == pytest.approx(0.6)


def test_the_machine_wide_line_serves_a_trainer_on_every_core(tmp_path: Path) -> None:
    """With no cores named and the trainer free to run on all of them, the first line (the
    machine's sum) is read, scaled by the machine's core count."""
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) < (os.cpu_count() or 1):
        pytest.skip("this test process is pinned to some of the cores")
    stat = tmp_path / "stat"
    load = CoreLoad(str(stat))
    _write_stat(stat, {0: (0, 0)})
    load.update()
    _write_stat(stat, {0: (100, 900)})  # a tenth of the ticks idle
    assert load.update() == ((os.cpu_count() or 1) * 0.1 < 0.5)
    assert load.idle_cores == pytest.approx((os.cpu_count() or 1) * 0.1)


@pytest.mark.parametrize(
    "content", [None, "", "intr 1 2 3\n", "cpu  1 2 x 4 5\n", "cpu 1 2\n", "cpu0 1 2 3 4 5\n"]
)
def test_an_unreadable_stat_reads_quiet_and_never_raises(
    tmp_path: Path, content: str | None
) -> None:
    """No /proc/stat (not Linux), one the probe cannot parse, or no line for the trainer's
    core: the cores read quiet."""
    stat = tmp_path / "stat"
    if content is not None:
        stat.write_text(content)
    for cpus in (None, frozenset({3})):
        load = CoreLoad(str(stat), cpus=cpus)
        assert load.update() is False
        assert load.update() is False
        assert load.idle_cores is None


@pytest.mark.serial  # it takes every core: beside another worker, that worker's runs starve
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_every_core_spinning_reads_busy() -> None:
    """The real /proc/stat, with a spinning process per core: busy within a reading, for
    the whole machine and for one core alone (a trainer pinned to it)."""
    whole, first = CoreLoad(), CoreLoad(cpus=frozenset({min(os.sched_getaffinity(0))}))
    with every_core_busy():
        time.sleep(1.0)  # the spinners are up (a spawned interpreter starts in ~0.1 s)
        whole.update(), first.update()
        time.sleep(1.0)
        assert whole.update() is True, whole.idle_cores
        assert first.update() is True, first.idle_cores
        assert whole.idle_cores is not None and whole.idle_cores < 0.5
