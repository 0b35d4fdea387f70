"""probe.checkpoint: atomic saves on a real filesystem, what is kept, and the fallback on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import probe
from probe import checkpoint
from tests.helpers import lines, stop_agent


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_keeps_the_last_n_with_index_and_latest(tmp_path: Path) -> None:
    """Past keep_last, older checkpoints are deleted; index.json and latest name what is kept."""
    for step in range(5):
        path = checkpoint.save({"step": step}, tmp_path, step, keep_last=2)
        assert path == tmp_path / f"ckpt-{step}.pt"
    assert names(tmp_path) == ["ckpt-3.pt", "ckpt-4.pt", "index.json", "latest"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-4.pt"
    index = json.loads((tmp_path / "index.json").read_text())
    assert [(e["step"], e["path"]) for e in index["checkpoints"]] == [
        (3, "ckpt-3.pt"),
        (4, "ckpt-4.pt"),
    ]
    assert index["checkpoints"][1]["size"] == (tmp_path / "ckpt-4.pt").stat().st_size
    obj, path = checkpoint.load(tmp_path)
    assert obj == {"step": 4} and path.name == "ckpt-4.pt"


@pytest.mark.parametrize(("mode", "best"), [("min", 1), ("max", 4)])
def test_the_best_by_its_metric_is_kept_too(tmp_path: Path, mode: Any, best: int) -> None:
    """The best checkpoint by best_metric survives the rotation, lowest or highest by mode."""
    losses = [5.0, 1.0, 3.0, 2.0, 9.0, 4.0, 6.0]
    for step, loss in enumerate(losses):
        checkpoint.save(
            {"step": step},
            tmp_path,
            step,
            keep_last=2,
            best_metric="val/loss",
            best_value=loss,
            mode=mode,
        )
    expected = sorted({best, 5, 6})
    kept = [e["step"] for e in json.loads((tmp_path / "index.json").read_text())["checkpoints"]]
    assert kept == expected
    assert [n for n in names(tmp_path) if n.endswith(".pt")] == sorted(
        f"ckpt-{s}.pt" for s in expected
    )


def test_a_corrupt_newest_falls_back_to_the_previous_with_a_warning(tmp_path: Path) -> None:
    """A truncated newest checkpoint is skipped, named in a warning, and the previous loaded."""
    for step in range(3):
        checkpoint.save({"weights": torch.full((64,), float(step))}, tmp_path, step)
    newest = tmp_path / "ckpt-2.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    with pytest.warns(UserWarning, match=r"could not load ckpt-2\.pt.*loaded ckpt-1\.pt"):
        obj, path = checkpoint.load(tmp_path)
    assert path.name == "ckpt-1.pt"
    assert torch.equal(obj["weights"], torch.full((64,), 1.0))


def test_load_without_a_loadable_checkpoint_says_so(tmp_path: Path) -> None:
    """No checkpoint: FileNotFoundError; only corrupt ones: RuntimeError naming each."""
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        checkpoint.load(tmp_path)
    checkpoint.save({"a": 1}, tmp_path, 7)
    (tmp_path / "ckpt-7.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match=r"could be loaded: ckpt-7\.pt"):
        checkpoint.load(tmp_path)


def test_a_crash_mid_write_leaves_no_temporary_file_and_the_old_checkpoints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save failing half-way raises to the caller, leaves no temp file, and keeps the
    previous checkpoint, index and latest pointer as they were."""
    checkpoint.save({"step": 0}, tmp_path, 0)
    before = {name: (tmp_path / name).read_bytes() for name in names(tmp_path)}

    def crash(obj: Any, file: Any) -> None:
        file.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save({"step": 1}, tmp_path, 1)
    assert {name: (tmp_path / name).read_bytes() for name in names(tmp_path)} == before
    assert checkpoint.load(tmp_path)[0] == {"step": 0}


def test_temporary_files_of_a_killed_save_are_removed_by_the_next(tmp_path: Path) -> None:
    """A temp file a killed process left behind is gone after the next save."""
    (tmp_path / ".ckpt-abc.tmp").write_bytes(b"PK\x03\x04")
    checkpoint.save({"step": 1}, tmp_path, 1)
    assert names(tmp_path) == ["ckpt-1.pt", "index.json", "latest"]


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    """Misuse is a ValueError that says what to fix."""
    with pytest.raises(ValueError, match="keep_last"):
        checkpoint.save({}, tmp_path, 1, keep_last=0)
    with pytest.raises(ValueError, match="step"):
        checkpoint.save({}, tmp_path, -1)
    with pytest.raises(ValueError, match="mode"):
        checkpoint.save({}, tmp_path, 1, mode="lowest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="together"):
        checkpoint.save({}, tmp_path, 1, best_metric="loss")
    with pytest.raises(ValueError, match="every_steps"):
        checkpoint.save({}, tmp_path, 1, every_steps=0)
    with pytest.raises(ValueError, match="every_seconds"):
        checkpoint.save({}, tmp_path, 1, every_seconds=float("nan"))


def test_each_save_sends_a_checkpoint_event(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """The agent stores a checkpoint event per save with its path, step, size, metric, whether
    it is the best so far, and the cadence the trainer declared."""
    assert probe.init(endpoint, run_id="ckpt-event")
    folder = tmp_path / "ckpts"
    checkpoint.save({"step": 3}, folder, 3, best_metric="loss", best_value=0.5, every_steps=3)
    checkpoint.save({"step": 6}, folder, 6, best_metric="loss", best_value=0.7, every_steps=3)
    assert probe.finish(5.0)
    assert stop_agent(agent) == 0
    events = [
        e
        for e in lines(runs_dir / "ckpt-event")
        if e["kind"] == "event" and e["name"] == "checkpoint"
    ]
    assert [e["step"] for e in events] == [3, 6]
    assert events[0]["attrs"] == {
        "path": str((folder / "ckpt-3.pt").resolve()),
        "size": (folder / "ckpt-3.pt").stat().st_size,
        "metric": "loss",
        "value": 0.5,
        "best": True,
        "every_steps": 3,
    }
    assert events[1]["attrs"]["best"] is False
