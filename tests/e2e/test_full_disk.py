"""A real trainer under ``outrider run --sinks none`` with its runs dir on a 1 MiB disk:
the disk fills, the agent keeps going and counts, space comes back, writing resumes,
and run.json ends with exact accounting."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import orjson

from tests.helpers import OUTRIDER, PYTHON, clean_env, lines, trainer_dir, wait_for
from tests.small_disk import SmallDisk

#: fills the disk, says so, waits for the test to make room, then logs a second phase
TRAIN = """\
import sys, time
from pathlib import Path
import probe

assert probe.init()
steps = int(sys.argv[1])
for step in range(steps):
    probe.log({"loss": 1.0 / (step + 1), "lr": 0.01, "acc": 0.5}, step=step)
    if step % 500 == 499:
        probe.flush()
probe.flush()
Path("filled").write_text("1")
deadline = time.monotonic() + 60
while not Path("go").exists() and time.monotonic() < deadline:
    time.sleep(0.05)
for step in range(steps, steps + 1000):
    probe.log({"loss": 1.0 / (step + 1), "lr": 0.01, "acc": 0.5}, step=step)
"""


def run_json(runs_dir: Path) -> dict[str, Any] | None:
    found = list(runs_dir.glob("*/run.json"))
    if not found:
        return None
    try:
        return orjson.loads(found[0].read_bytes())  # type: ignore[no-any-return]
    except orjson.JSONDecodeError:
        return None  # cannot happen with an atomic rename; the assertion below would say so


def test_a_full_disk_is_counted_and_writing_resumes_when_space_comes_back(
    small_disk: SmallDisk, tmp_path: Path
) -> None:
    """The trainer finishes normally; the agent never dies; a store_failed alert fires;
    per stream received + dropped + lost == sent with the refused records counted under
    store_full; metrics.jsonl holds whole lines only, the second phase's included."""
    work = trainer_dir(tmp_path / "work", {"train.py": TRAIN})
    steps = 10_000  # about 1.8 MB of lines
    if small_disk.tmpfs:
        small_disk.fill(leave=300_000)  # room to start a run, not to store it
    launcher = subprocess.Popen(
        [OUTRIDER, "run", "--runs-dir", str(small_disk.dir), "--", PYTHON, "train.py", str(steps)],
        cwd=work,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=small_disk.preexec(),
    )
    try:
        wait_for(lambda: (work / "filled").exists() or launcher.poll() is not None, 120, "phase 1")
        assert launcher.poll() is None, launcher.communicate()

        def refused() -> bool:
            info = run_json(small_disk.dir)
            return bool(info and info["not_stored"].get("store_full"))

        wait_for(refused, 30, "run.json to count records not stored")
        small_disk.make_room()  # a file size limit stays: then nothing comes back
        (work / "go").write_text("1")
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.communicate()
    assert launcher.returncode == 0, stderr
    assert "Traceback" not in stderr and "store_failed" in stderr, stderr
    info = run_json(small_disk.dir)
    assert info is not None and info["status"] == "finished"
    for stream in info["streams"]:
        dropped = sum(stream["dropped"].values())
        assert stream["received"] + dropped + stream["lost"] == stream["sent"], stream
        assert stream["lost"] == 0 and stream["complete"], stream
    (trainer,) = [s for s in info["streams"] if s["rank"] >= 0]
    not_stored = trainer["not_stored"].get("store_full", 0)
    assert not_stored > 0 and info["not_stored"]["store_full"] >= not_stored
    run_dir = next(small_disk.dir.glob("*/"))
    data = (run_dir / "metrics.jsonl").read_bytes()
    assert data.endswith(b"\n")
    for line in data.splitlines():
        orjson.loads(line)  # no half line anywhere
    stored = [e for e in lines(run_dir) if e["stream"] == trainer["stream"]]
    if small_disk.tmpfs:
        assert any((e["step"] or -1) >= steps for e in stored), "writing did not resume"
        assert info["store"]["failing"] is None
    shown = subprocess.run(
        [OUTRIDER, "show", "latest", "--runs-dir", str(small_disk.dir)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert f"received records not stored (store_full {info['not_stored']['store_full']})" in (
        shown.stdout
    )
