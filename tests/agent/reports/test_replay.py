"""`outrider replay` sends a run a real agent stored into sinks later, with its original
steps and times: TensorBoard read back with TensorBoard's reader, W&B offline read back
from its transaction log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.agent.reports.conftest import RUNS, expected_loss
from tests.helpers import lines, outrider
from tests.wandb_reader import read_offline_run


def replay(stored: dict[str, Any], *args: str) -> Any:
    return outrider("replay", *args, "--runs-dir", str(stored["runs"]), timeout=120)


def stored_losses(stored: dict[str, Any], run: str) -> list[tuple[int, float, float]]:
    """(step, t, loss) of every stored loss point of ``run``."""
    return [
        (entry["step"], entry["t"], entry["metrics"]["loss"])
        for entry in lines(stored["runs"] / run)
        if entry["kind"] == "scalars" and "loss" in entry["metrics"]
    ]


def test_replay_into_a_new_tensorboard_dir_keeps_steps_and_wall_times(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    """Every loss point is in the new log at its stored step and its stored time."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    done = replay(
        stored,
        "lr-small",
        "--sinks",
        "tensorboard",
        "--set",
        f"tensorboard.logdir={logdir}",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    [sink] = orjson.loads(done.stdout)["sinks"]
    assert (sink["sink"], sink["error"], sink["target"]) == (
        "tensorboard",
        None,
        str(logdir / "lr-small"),
    )
    events = EventAccumulator(str(logdir / "lr-small"), size_guidance={"scalars": 0})
    events.Reload()
    read = [(e.step, e.wall_time, e.value) for e in events.Scalars("loss")]
    expected = stored_losses(stored, "lr-small")
    assert [(step, t) for step, t, _ in read] == [(step, t) for step, t, _ in expected]
    assert [value for *_, value in read] == pytest.approx([v for *_, v in expected], rel=1e-6)
    assert len(read) == RUNS["lr-small"][1]
    assert not (stored["runs"] / "lr-small" / "tensorboard").exists()


def test_replay_into_wandb_offline_keeps_steps_and_times(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    """The offline W&B run has a history row per step (no folding), at the stored step and
    time, under a new run id given with --as; the config came along."""
    done = replay(
        stored,
        "lr-large",
        "--sinks",
        "wandb",
        "--set",
        f"wandb.dir={tmp_path}",
        "--set",
        "wandb.mode=offline",
        "--as",
        "lr-large-again",
    )
    assert done.returncode == 0, done.stderr
    assert "wandb" in done.stdout and "ok" in done.stdout
    run = read_offline_run(tmp_path)
    assert run.run_id == "lr-large-again"
    rows = [row for row in run.history if "loss" in row]
    expected = stored_losses(stored, "lr-large")
    assert [row["trainer/step"] for row in rows] == [step for step, _, _ in expected]
    assert [row["_timestamp"] for row in rows] == pytest.approx([t for _, t, _ in expected])
    assert rows[-1]["loss"] == pytest.approx(expected_loss("lr-large", RUNS["lr-large"][1] - 1))
    assert run.config["lr"] == 0.1


def test_live_only_sinks_and_a_second_copy_are_refused_in_one_line(
    stored: dict[str, Any], tmp_path: Path
) -> None:
    """Prometheus is refused with its reason; the run's own TensorBoard dir, once it has
    logs, is not written twice; a bad --set is a usage error."""
    done = replay(stored, "lr-small", "--sinks", "prometheus")
    assert done.returncode == 1
    assert "sink prometheus cannot replay a run: Prometheus serves live gauges" in done.stderr
    own = stored["runs"] / "lr-large" / "tensorboard"
    own.mkdir()
    (own / "events.out.tfevents.1.host").write_bytes(b"")
    try:
        done = replay(stored, "lr-large", "--sinks", "tensorboard")
        assert done.returncode == 1
        assert "already has TensorBoard logs" in done.stderr
        assert "--set tensorboard.logdir=DIR" in done.stderr
    finally:
        (own / "events.out.tfevents.1.host").unlink()
        own.rmdir()
    done = replay(stored, "lr-small", "--set", "logdir")
    assert done.returncode == 2 and "SINK.OPTION=VALUE" in done.stderr
    done = replay(stored, "lr-small", "--set", "tensorbored.logdir=x")
    assert done.returncode == 2 and "unknown sink 'tensorbored'" in done.stderr
    assert "Traceback" not in done.stderr


def test_sources_follow_the_stored_streams_and_a_failing_sink_is_named(
    stored: dict[str, Any],
) -> None:
    """Batches carry each stream's announced source, run_end comes last, the run can be
    renamed; a sink that keeps failing is retried, given up and named, the others go on."""
    from agent.reports.replay import SinkReplay, replay
    from sinks.memory import MemorySink
    from tests.faulty_sinks import RaisingSink

    memory, raising = MemorySink(), RaisingSink()
    targets = [SinkReplay("memory", memory, "memory"), SinkReplay("raising", raising, "x")]
    done = replay(stored["runs"] / "lr-small", targets, run_id="renamed", sleep=lambda _: None)
    stored_lines = lines(stored["runs"] / "lr-small", agent_lines=True)
    assert memory.entries() == stored_lines and memory.closed
    trainer = [b for b in memory.batches if b.source.stream != "agent"]
    announced = stored_lines[0]["source"]
    assert {b.source.run for b in memory.batches} == {"renamed"}
    assert {(b.source.stream, b.source.pid, b.source.rank) for b in trainer} == {
        (announced["stream"], announced["pid"], 0)
    }
    assert done.sinks[1].error == "ConnectionError: the collector is down"
    assert raising.calls == 4 and done.sinks[1].retries == 3  # then given up


def test_a_job_views_lines_get_the_aggregators_sources(tmp_path: Path) -> None:
    """A job view's rank lines go out as the aggregator sent them live: stream `node`, the
    rank's host, the job's world size; its own lines as stream `aggregator`."""
    from agent.reports.replay import SinkReplay, replay
    from sinks.memory import MemorySink

    job_dir = tmp_path / "jobs" / "job7"
    job_dir.mkdir(parents=True)
    info = {"run_id": "job7", "status": "finished", "job": {"ranks": [{"rank": 0}, {"rank": 1}]}}
    (job_dir / "run.json").write_bytes(orjson.dumps(info))
    entries = [
        {"kind": "scalars", "stream": "agent", "rank": r, "host": f"n{r}", "step": 99, "t": 1.0,
         "metrics": {"loss": 1.0}}
        for r in (0, 1)
    ] + [{"kind": "scalars", "stream": "agent", "rank": -1, "step": 99, "t": 2.0,
          "metrics": {"job/slowest_rank": 1}}]  # fmt: skip
    (job_dir / "metrics.jsonl").write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in entries))
    memory = MemorySink()
    replay(job_dir, [SinkReplay("memory", memory, "memory")])
    sources = [(b.source.stream, b.source.rank, b.source.host, b.source.world_size)
               for b in memory.batches]  # fmt: skip
    assert sources == [("node", 0, "n0", 2), ("node", 1, "n1", 2), ("aggregator", -1, "", 2)]
    assert {b.source.run for b in memory.batches} == {"job7"}
