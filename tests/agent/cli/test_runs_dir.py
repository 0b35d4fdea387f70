"""An unusable runs directory (full, read-only, no permission, vanished): one clear line,
never a traceback; ``outrider run`` still runs the command, with telemetry off."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import PYTHON, outrider, trainer_dir
from tests.small_disk import SmallDisk

TRAIN = """\
import probe

print("telemetry", "on" if probe.init() else "off", flush=True)
probe.log({"loss": 1.0}, step=0)
open("ran", "w").write("yes")
"""


def outrider_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def run_on(runs_dir: Path, work: Path, *options: str) -> tuple[int, str, str]:
    work = trainer_dir(work, {"train.py": TRAIN})
    done = outrider(
        "run", "--runs-dir", str(runs_dir), *options, "--", PYTHON, "train.py", cwd=work
    )
    return done.returncode, done.stdout, done.stderr


def test_run_on_a_full_disk_runs_the_command_with_telemetry_off(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    """One line says the runs dir is full; the trainer runs, telemetry off, exit 0."""
    trainer_dir(tmp_path / "work", {"train.py": TRAIN})
    small_disk.fill(leave=0 if small_disk.tmpfs else 1000)  # a size limit: the trainer's files
    status, stdout, stderr = run_on(small_disk.dir, tmp_path / "work")
    assert status == 0, stderr
    assert (tmp_path / "work" / "ran").exists() and "telemetry off" in stdout
    (line,) = outrider_lines(stderr)
    assert line.startswith(f"outrider: cannot store runs in {small_disk.dir}: ")
    assert line.endswith("running the command with telemetry OFF")
    if small_disk.tmpfs:
        assert "the filesystem is full" in line


def test_run_on_a_read_only_disk_runs_the_command_with_telemetry_off(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    """A read-only filesystem: the same, naming it; --require-agent exits 2 without running."""
    small_disk.read_only()
    status, stdout, stderr = run_on(small_disk.dir, tmp_path / "work")
    assert status == 0 and "telemetry off" in stdout
    (line,) = outrider_lines(stderr)
    assert "the filesystem is read-only" in line and "telemetry OFF" in line
    status, stdout, stderr = run_on(small_disk.dir, tmp_path / "strict", "--require-agent")
    assert status == 2 and not (tmp_path / "strict" / "ran").exists()
    (line,) = outrider_lines(stderr)
    assert "read-only" in line and "not running the command" in line


def test_agent_on_a_full_disk_says_why_in_one_line(small_disk: SmallDisk) -> None:
    """``outrider agent`` refuses to start on a full disk with one line and exit 1."""
    small_disk.fill()
    done = outrider("agent", "--runs-dir", str(small_disk.dir), "--tcp", "0")
    assert done.returncode == 1
    (line,) = outrider_lines(done.stderr)
    assert line.startswith(f"Error: cannot store runs in {small_disk.dir}: "), done.stderr


def test_run_with_no_permission_on_the_runs_dir(tmp_path: Path) -> None:
    """A runs dir the user may not write: one line, the command runs."""
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere: permissions cannot be denied to it")
    runs_dir = tmp_path / "locked"
    runs_dir.mkdir(mode=0o500)
    status, stdout, stderr = run_on(runs_dir, tmp_path / "work")
    assert status == 0 and "telemetry off" in stdout
    (line,) = outrider_lines(stderr)
    assert "no permission" in line


def test_show_and_runs_on_a_vanished_or_unreadable_runs_dir(tmp_path: Path) -> None:
    """A runs dir that is gone, or a file, or unreadable: one line each, no traceback."""
    gone = tmp_path / "gone"
    for command in (["show", "latest"], ["show", "some-run"]):
        done = outrider(*command, "--runs-dir", str(gone))
        assert done.returncode == 1
        (line,) = outrider_lines(done.stderr)
        assert line.startswith("Error: no run") and str(gone) in line
    done = outrider("runs", "--runs-dir", str(gone))
    assert done.returncode == 0 and done.stdout.strip() == f"no runs in {gone}"
    run_dir = tmp_path / "runs" / "broken"
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text("{ half a json")
    done = outrider("show", "broken", "--runs-dir", str(tmp_path / "runs"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    (line,) = outrider_lines(done.stderr)
    assert "cannot read run 'broken'" in line and "not JSON" in line
