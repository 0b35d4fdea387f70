"""The agent's check of saved checkpoints: on real files, and end to end with a real agent
process, a trainer that saves and a file truncated or deleted before the check."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import orjson
import torch

from agent.analysis.checkpoints import check
from agent.analysis.messages import CheckpointSaved
from tests.helpers import lines, run_trainer, stop_agent, wait_for


def saved(path: Path, size: int | None = None) -> CheckpointSaved:
    return CheckpointSaved("run", 0, 1, str(path), size)


def torch_file(path: Path) -> int:
    torch.save({"w": torch.arange(1000.0)}, path)
    return path.stat().st_size


def test_a_whole_checkpoint_is_hashed(tmp_path: Path) -> None:
    """A torch.save file of the saved size passes, with the sha256 of its bytes."""
    path = tmp_path / "ckpt-1.pt"
    size = torch_file(path)
    result = check(saved(path, size))
    assert result.problem is None and not result.rotated
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_truncated_or_resized_checkpoint_fails(tmp_path: Path) -> None:
    """Truncation fails the archive check; a size other than the saved one fails first."""
    path = tmp_path / "ckpt-1.pt"
    size = torch_file(path)
    path.write_bytes(path.read_bytes()[: size // 2])
    assert "not a torch zip archive" in str(check(saved(path)).problem)
    assert f"the trainer saved {size}" in str(check(saved(path, size)).problem)


def test_a_zip_that_torch_did_not_write_fails(tmp_path: Path) -> None:
    """A zip archive without torch's data.pkl is not a checkpoint."""
    path = tmp_path / "ckpt-1.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    assert "without torch's data.pkl" in str(check(saved(path)).problem)


def test_a_missing_file_fails_unless_its_saver_rotated_it_away(tmp_path: Path) -> None:
    """Gone and still listed (or no index): a failure; gone and unlisted: skipped."""
    path = tmp_path / "ckpt-1.pt"
    assert "does not exist" in str(check(saved(path, 10)).problem)
    index = {"checkpoints": [{"step": 1, "path": "ckpt-1.pt", "size": 10}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    assert "does not exist" in str(check(saved(path, 10)).problem)
    index["checkpoints"] = [{"step": 2, "path": "ckpt-2.pt", "size": 10}]
    (tmp_path / "index.json").write_text(json.dumps(index))
    result = check(saved(path, 10))
    assert result.rotated and result.problem is None


TRAINER = """
import os, pathlib, torch, probe
from probe import checkpoint
probe.init()
folder = pathlib.Path(os.environ["CKPT_DIR"])
checkpoint.save({"w": torch.ones(64)}, folder, 1)
# the trainer's own saver: one file truncated, one deleted before the event leaves
own = folder / "own"
own.mkdir()
for step in (2, 4):
    path = own / f"ckpt-{step}.pt"
    torch.save({"w": torch.ones(64)}, path)
    size = path.stat().st_size
    if step == 2:
        path.write_bytes(path.read_bytes()[: size // 2])
    else:
        path.unlink()
    probe.event("checkpoint", step=step, path=str(path), size=size)
checkpoint.save({"w": torch.zeros(64)}, folder, 3)
probe.finish()
"""


def checkpoint_events(run_dir: Path) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for entry in lines(run_dir, agent_lines=True):
        if entry.get("kind") == "event" and str(entry.get("name")).startswith("checkpoint"):
            found.setdefault(entry["name"], []).append(entry)
    return found


def test_the_agent_verifies_each_saved_checkpoint_and_alerts_on_a_bad_one(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """Saved checkpoints are stored as checkpoint_verified with their sha256; a truncated
    and a deleted one as checkpoint_failed, each raising the checkpoint_failed alert."""
    folder = tmp_path / "ckpts"
    done = run_trainer(TRAINER, endpoint, "ckpt-check", CKPT_DIR=str(folder))
    assert done.returncode == 0, done.stderr
    run_dir = runs_dir / "ckpt-check"

    def checked() -> dict[str, list[dict[str, Any]]] | None:
        events = checkpoint_events(run_dir)
        count = len(events.get("checkpoint_verified", [])) + len(
            events.get("checkpoint_failed", [])
        )
        return events if count >= 4 else None

    events = wait_for(checked, 30.0, "four checkpoint checks in metrics.jsonl")
    assert stop_agent(agent) == 0
    assert len(events["checkpoint"]) == 4
    verified = {e["step"]: e["attrs"] for e in events["checkpoint_verified"]}
    assert sorted(verified) == [1, 3]
    for step, attrs in verified.items():
        path = folder / f"ckpt-{step}.pt"
        assert attrs["path"] == str(path.resolve())
        assert attrs["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    failed = {e["step"]: e["attrs"]["problem"] for e in events["checkpoint_failed"]}
    assert sorted(failed) == [2, 4]
    assert "not a torch zip archive" in failed[2] or "the trainer saved" in failed[2]
    assert "does not exist" in failed[4]
    alerts = [orjson.loads(line) for line in (run_dir / "alerts.jsonl").read_bytes().splitlines()]
    fired = [a for a in alerts if a["name"] == "checkpoint_failed"]
    assert len(fired) == 2 and all(a["severity"] == "error" for a in fired)
    messages = sorted(a["message"] for a in fired)
    assert "its check: step 2:" in messages[0] and "ckpt-2.pt" in messages[0]
    assert "its check: step 4:" in messages[1] and "does not exist" in messages[1]


CADENCE_TRAINER = """
import os, pathlib, time, torch, probe
from probe import checkpoint
probe.init()
folder = pathlib.Path(os.environ["CKPT_DIR"])
last_save = int(os.environ["LAST_SAVE"])
alerts = pathlib.Path(os.environ["RUN_DIR"]) / "alerts.jsonl"
step, deadline, after = 0, time.monotonic() + 30.0, None
while step < 300 or (after is None and last_save < 300 and time.monotonic() < deadline):
    probe.log({"loss": 1.0 / (step + 1)}, step=step)
    if step % 20 == 0 and step <= last_save:
        checkpoint.save(
            {"step": step}, folder, step, every_steps=20, best_metric="m", best_value=step % 40
        )
    if after is None and alerts.exists() and b"checkpoint_missing" in alerts.read_bytes():
        after = step  # training goes on a while after the alert: it must not fire again
    if after is not None and step >= after + 100:
        break
    step += 1
    time.sleep(0.01)
probe.finish()
"""


def missing_alerts(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "alerts.jsonl"
    found = [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []
    return [a for a in found if a["name"] == "checkpoint_missing"]


def test_a_run_that_stops_saving_raises_checkpoint_missing_once(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """Saves declared every 20 steps stop at step 60: one checkpoint_missing warning while
    training goes on; a run that saves every 20 steps to its end raises none, and its
    verified checkpoints say which save was the best."""
    for run_id, last_save in (("stops-saving", 60), ("saves-on-time", 1000)):
        done = run_trainer(
            CADENCE_TRAINER,
            endpoint,
            run_id,
            CKPT_DIR=str(tmp_path / run_id),
            LAST_SAVE=str(last_save),
            RUN_DIR=str(runs_dir / run_id),
        )
        assert done.returncode == 0, done.stderr
    assert stop_agent(agent) == 0
    (alert,) = missing_alerts(runs_dir / "stops-saving")
    assert alert["severity"] == "warning" and alert["rank"] == 0
    assert alert["attrs"]["value"] > 30 and alert["attrs"]["threshold"] == 30
    assert "last good: step 60 (ckpt-60.pt)" in alert["message"]
    assert missing_alerts(runs_dir / "saves-on-time") == []
    checked = checkpoint_events(runs_dir / "saves-on-time")
    saves = checked["checkpoint"]
    assert len(saves) == 15 and all(e["attrs"]["every_steps"] == 20 for e in saves)
    outcomes = checked.get("checkpoint_verified", []) + checked.get("checkpoint_skipped", [])
    assert len(outcomes) == 15  # skipped: rotated away (keep_last=3) before the check
    best = [e["step"] for e in checked["checkpoint_verified"] if e["attrs"].get("best")]
    assert best == [0]  # m = step % 40: step 0's 0 is never beaten, only tied
