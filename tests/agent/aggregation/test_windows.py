"""JobWindows: rank summaries gathered by window index, released complete, stale or evicted."""

from __future__ import annotations

import pytest

from agent.aggregation.windows import JobWindows
from tests.agent.aggregation.factory import summary


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_window_is_released_once_every_rank_reported_it() -> None:
    """With world_size 4, window 0 waits for the 4th rank, then comes out complete, once."""
    windows = JobWindows()
    for rank in range(3):
        windows.add(summary(rank, 0, {"loss": 1.0}, world_size=4))
    assert windows.ready() == []
    windows.add(summary(3, 0, {"loss": 1.0}, world_size=4))
    [window] = windows.ready()
    assert window.index == 0 and window.complete and window.missing == []
    assert sorted(window.ranks) == [0, 1, 2, 3]
    assert window.ranks[3]["rank"] == 3
    assert window.host(3) == "node0" and window.local_rank(3) == 3
    assert windows.ready() == []
    assert windows.counters["released"] == 1 and windows.counters["incomplete"] == 0


def test_expected_ranks_are_the_ranks_seen_without_a_world_size() -> None:
    """Without world_size, a window is complete when every rank seen so far reported it."""
    windows = JobWindows()
    windows.add(summary(0, 0))
    windows.add(summary(1, 1))  # a rank seen first in window 1
    # Rank 1 reported window 1, so it never sends 0: window 0 goes as stale.
    assert [(w.index, w.missing) for w in windows.ready()] == [(0, [1])]
    windows.add(summary(2, 1))
    assert windows.ready() == []  # window 1 waits for rank 0
    windows.add(summary(0, 1))
    assert [(w.index, w.missing) for w in windows.ready()] == [(1, [])]


def test_a_window_is_stale_once_its_missing_ranks_reported_later_windows() -> None:
    """Rank 1 skipped window 5 (no line in it): window 5 goes when rank 1 reports window 6."""
    windows = JobWindows()
    windows.add(summary(0, 5, world_size=2))
    windows.add(summary(0, 6, world_size=2))
    assert windows.ready() == []
    windows.add(summary(1, 6, world_size=2))
    released = windows.ready()
    assert [(w.index, w.missing, w.complete) for w in released] == [(5, [1], False), (6, [], True)]
    assert windows.counters["incomplete"] == 1


def test_a_window_is_released_after_max_wait_seconds() -> None:
    """A rank that stopped reporting holds a window for max_wait_seconds, not forever."""
    clock = Clock()
    windows = JobWindows(max_wait_seconds=30.0, clock=clock)
    windows.add(summary(0, 0, world_size=3))
    clock.now += 10
    windows.add(summary(1, 0, world_size=3))
    clock.now += 19.9
    assert windows.ready() == []
    clock.now += 0.1
    [window] = windows.ready()
    assert window.index == 0 and window.missing == [2] and not window.complete


def test_open_windows_are_bounded_and_the_oldest_is_released_incomplete() -> None:
    """max_open windows at most: a new index pushes the oldest out, incomplete and counted."""
    windows = JobWindows(max_open=3)
    for index in range(5):
        windows.add(summary(0, index, world_size=2))  # rank 1 never reports
    assert windows.open_windows == 3
    released = windows.ready()
    assert [(w.index, w.missing) for w in released] == [(0, [1]), (1, [1])]
    assert windows.counters["evicted"] == 2


def test_late_summaries_of_a_released_window_are_dropped_and_counted() -> None:
    """A summary for a window already released does not open it again."""
    windows = JobWindows(max_wait_seconds=5.0, clock=Clock())
    windows.add(summary(0, 0, world_size=2))
    windows.add(summary(0, 1, world_size=2))
    windows.add(summary(1, 1, world_size=2))
    assert [w.index for w in windows.ready()] == [0, 1]
    windows.add(summary(1, 0, world_size=2))
    assert windows.open_windows == 0 and windows.ready() == []
    assert windows.counters["late"] == 1


def test_a_restart_replaces_the_ranks_older_restart_data() -> None:
    """A higher restart count replaces the rank's open data; older-restart summaries drop."""
    windows = JobWindows()
    windows.add(summary(0, 3, {"loss": 9.0}, world_size=2))
    windows.add(summary(0, 2, {"loss": 1.0}, restart=1, world_size=2))
    windows.add(summary(1, 3, {"loss": 9.0}, world_size=2))  # rank 1, before its restart
    windows.add(summary(1, 2, {"loss": 1.0}, restart=1, world_size=2))
    windows.add(summary(1, 3, {"loss": 8.0}, restart=0, world_size=2))  # old, arrives late
    released = windows.ready()
    assert [(w.index, w.complete) for w in released] == [(2, True)]
    assert {w.restart(rank) for w in released for rank in w.ranks} == {1}
    assert windows.counters["superseded"] == 1
    windows.add(summary(0, 3, {"loss": 1.1}, restart=1, world_size=2))
    windows.add(summary(1, 3, {"loss": 1.2}, restart=1, world_size=2))
    [window] = windows.ready()
    assert window.index == 3 and window.complete
    assert {rank: s["metrics"]["loss"]["mean"] for rank, s in window.ranks.items()} == {
        0: 1.1,
        1: 1.2,
    }


def test_after_a_restart_released_indices_can_come_again() -> None:
    """A restart from a checkpoint repeats window indices: they are new windows, not late."""
    windows = JobWindows()
    for index in range(3):
        for rank in range(2):
            windows.add(summary(rank, index, world_size=2))
    assert [w.index for w in windows.ready()] == [0, 1, 2]
    for rank in range(2):
        windows.add(summary(rank, 1, restart=1, world_size=2))
    assert [(w.index, w.complete) for w in windows.ready()] == [(1, True)]
    assert windows.counters["late"] == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"scope": "epoch"},
        {"kind": "scalars"},
        {"index": None},
        {"index": -1},
        {"rank": "3"},
        {"rank": True},
    ],
)
def test_entries_that_are_not_rank_window_summaries_are_refused(bad: dict) -> None:
    """Epoch summaries, other kinds and summaries without an index or rank are counted out."""
    windows = JobWindows()
    windows.add({**summary(0, 0), **bad})
    assert windows.open_windows == 0 and windows.counters["refused"] == 1


def test_ranks_are_bounded() -> None:
    """Past max_ranks distinct ranks, a new rank's summaries are refused."""
    windows = JobWindows(max_ranks=2)
    for rank in range(3):
        windows.add(summary(rank, 0))
    assert windows.counters["refused"] == 1 and windows.expected == [0, 1]


def test_settings_are_checked() -> None:
    """max_open and max_wait_seconds must be positive: a clear ValueError otherwise."""
    with pytest.raises(ValueError, match="max_open"):
        JobWindows(max_open=0)
    with pytest.raises(ValueError, match="max_wait_seconds"):
        JobWindows(max_wait_seconds=0)
