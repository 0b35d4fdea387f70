"""RunLog reads stored lines back as series, live and finished; downsampling keeps spikes."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import orjson

from agent.store.series import RunLog, downsample, name_filter


def _line(entry: dict) -> bytes:
    return orjson.dumps(entry) + b"\n"


def _scalars(step: int, rank: int = 0, **metrics: float | str) -> dict:
    return {"kind": "scalars", "step": step, "t": 100.0 + step, "rank": rank, "metrics": metrics}


def test_reads_series_per_metric_with_ranks_and_non_finite(tmp_path: Path) -> None:
    lines = [
        _scalars(0, loss=2.0, lr=0.1),
        _scalars(0, rank=1, loss=2.5),
        _scalars(1, loss="NaN"),
        {"kind": "alert", "name": "nonfinite", "severity": "critical", "step": 1, "t": 101.0},
        {
            "kind": "system",
            "t": 101.5,
            "cpu_percent": 50.0,
            "gpus": [{"index": 0, "util_percent": 9}],
        },
        {"kind": "config", "params": {"lr": 0.1}},
        {"kind": "config", "params": {"batch": 8}},
    ]
    (tmp_path / "metrics.jsonl").write_bytes(b"".join(map(_line, lines)) + b"not json\n")
    log = RunLog.read(tmp_path)
    loss = log.series["loss"]
    assert loss.ranks == [0, 1, 0]
    steps, _, values = loss.arrays(rank=0)
    assert list(steps) == [0.0, 1.0] and values[0] == 2.0 and math.isnan(values[1])
    assert log.series["system/gpu0/util_percent"].values == [9.0]
    assert [a["name"] for a in log.alerts] == ["nonfinite"]
    assert log.config() == {"lr": 0.1, "batch": 8}
    assert log.corrupt_lines == 1
    assert log.metric_names(system=False) == ["loss", "lr"]


def test_update_takes_only_whole_lines_of_a_live_file(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    whole = _line(_scalars(0, loss=1.0))
    second = _line(_scalars(1, loss=0.5))
    path.write_bytes(whole + second[:10])
    log = RunLog(tmp_path)
    assert log.update() == 1
    assert log.update() == 0
    with open(path, "ab") as file:
        file.write(second[10:])
    assert log.update() == 1
    assert log.series["loss"].values == [1.0, 0.5]


def test_missing_file_is_empty_and_name_filter_selects(tmp_path: Path) -> None:
    assert RunLog.read(tmp_path).series == {}
    (tmp_path / "metrics.jsonl").write_bytes(_line(_scalars(0, loss=1.0, **{"val/loss": 2.0})))
    log = RunLog.read(tmp_path, name_filter(["val/*"]))
    assert list(log.series) == ["val/loss"]


def test_downsample_keeps_the_spike_and_the_ends() -> None:
    values = np.ones(1_000_000)
    values[654_321] = 50.0
    values[777_777] = math.nan
    kept = downsample(values, 500)
    assert len(kept) <= 2000
    assert 654_321 in kept and 777_777 in kept
    assert kept[0] == 0 and kept[-1] == 999_999
    assert np.all(np.diff(kept) > 0)
    assert list(downsample(np.arange(10.0), 500)) == list(range(10))
