"""The W&B sink through a real SinkWorker and the real wandb library, offline.

Runs are read back from wandb's own transaction log (``run-*.wandb``): the
leveldb-style record framing wandb writes, decoded with wandb's protobuf
``Record``. wandb 0.31 reads these files only in its Go core, so the framing
(a 7-byte header, 32 KiB blocks of CRC-checked chunks) is parsed here.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import pytest

from sinks import registry, schema
from sinks.base import Batch, Source
from sinks.registry import SinkContext
from sinks.wandb import ALERTS_KEY, WandbSink, merge_bins, resolve_mode, wandb_run_id
from sinks.worker import SinkWorker
from tests.helpers import REPO, wait_for
from tests.wandb_reader import OfflineRun, read_offline_run


# -- feeding the sink ---------------------------------------------------------------------------
def source(run: str, rank: int = 0, stream: str = "s0") -> Source:
    return Source(run, stream, rank, max(rank, 0), 2, "node-a", 1234)


def entry(kind: str, step: Any = None, rank: int = 0, **body: Any) -> dict[str, Any]:
    return {"kind": kind, "step": step, "rank": rank, "t": 1.0, "stream": "s", "seq": 0, **body}


def scalars(step: int | None, rank: int = 0, **metrics: Any) -> dict[str, Any]:
    return entry("scalars", step, rank, metrics=metrics)


def run_sink(runs_dir: Path, batches: list[Batch], **options: Any) -> tuple[WandbSink, SinkWorker]:
    """Everything through a real SinkWorker, then a clean close; a W&B row for every step
    unless ``rows_per_second`` is given, written as it comes unless ``offline_at_end`` is
    given (these tests check what each entry becomes)."""
    options.setdefault("rows_per_second", 0)
    options.setdefault("offline_at_end", False)
    sink = WandbSink(WandbSink.Options(**options), SinkContext(runs_dir))
    worker = SinkWorker(sink, flush_interval=0.2)
    for batch in batches:
        worker.submit(batch)
    assert worker.close(timeout=60), "the wandb sink did not close"
    return sink, worker


@pytest.fixture(scope="module", autouse=True)
def wandb_offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """wandb offline and silent, every file of it under tmp, no credentials from this host."""
    home = tmp_path_factory.mktemp("wandb-home")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
            patch.delenv(name, raising=False)
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("NETRC", str(home / "netrc"))  # absent: no key from ~/.netrc
        for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
            patch.setenv(f"WANDB_{name}", str(home / name.lower()))
        yield
        if "wandb" in sys.modules:  # stop wandb-core; it also drops WANDB_SERVICE from os.environ
            sys.modules["wandb"].teardown()


HIST_COUNTS = [float(i % 7) for i in range(1000)]
HIST_EDGES = [i * 0.01 for i in range(1001)]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[WandbSink, OfflineRun]:
    """One run with every kind of entry, rank 1's data and a late batch after run_end."""
    runs_dir = tmp_path_factory.mktemp("runs")
    run_dir = runs_dir / "run-a"
    run_dir.mkdir()
    PIL.Image.new("RGB", (4, 3), "red").save(run_dir / "plot.png")
    run_info = {"command": ["python", "train.py", "--lr", "0.1"], "git": {"commit": "abc123"}}
    (run_dir / "run.json").write_text(json.dumps(run_info))
    hello = entry("hello", None, argv=["train.py", "--lr", "0.1"], cwd="/src", python="3.11.7")
    texts = [entry("text", i, name="samples", text=f"line {i}") for i in range(205)]
    rank0 = [
        hello,
        entry("config", None, params={"lr": 0.1, "model": {"layers": 4}}),
        scalars(1, loss=2.0, acc=0.5),
        scalars(1, grad_norm="NaN"),
        scalars(3, loss="Infinity"),
        scalars(2, loss=1.0),  # out of order
        scalars(5, loss=0.5),
        scalars(2, loss=0.8),  # a step seen before
        entry("histogram", 4, name="weights", counts=HIST_COUNTS, edges=HIST_EDGES),
        entry("histogram", 4, name="bias", counts=[1, 2, 3], edges=[0.0, 0.5, 1.0, 1.5]),
        *texts,
        entry("image", 4, name="plot", path="plot.png"),
        entry("alert", 5, rank=-1, name="loss_spike", severity="warning", message="loss x10"),
        entry("heartbeat", None),
    ]
    batches = [
        Batch(source("run-a"), rank0, str(run_dir)),
        Batch(source("run-a", rank=1, stream="s1"), [scalars(1, rank=1, loss=9.0)], str(run_dir)),
        Batch(
            source("run-a", rank=-1, stream="launcher"),
            [entry("run_end", None, rank=-1, exit_status=3), entry("bye", None, rank=-1)],
            str(run_dir),
        ),
        Batch(source("run-a"), [scalars(10, late=1.0)], str(run_dir)),
    ]
    sink, worker = run_sink(runs_dir, batches)
    assert worker.stats.failures == 0, worker.stats.last_error
    return sink, read_offline_run(run_dir)


# -- the tests -------------------------------------------------------------------------------
def test_run_is_offline_under_the_run_dir_with_the_run_id(
    offline_run: tuple[WandbSink, OfflineRun],
) -> None:
    """Without a key the run is written offline to <run_dir>/wandb/, W&B id = outrider id."""
    sink, run = offline_run
    assert sink.mode == "offline"
    assert run.run_dir.parent.parent.name == "run-a"
    assert run.run_id == "run-a"
    assert run.step_metrics == {"*": "trainer/step"}


def test_scalars_are_logged_against_trainer_step(
    offline_run: tuple[WandbSink, OfflineRun],
) -> None:
    """Values (NaN/Infinity strings as floats) keep their step, in any order, repeats included."""
    _, run = offline_run
    assert run.series("loss") == [(1, 2.0), (3, math.inf), (2, 1.0), (5, 0.5), (2, 0.8)]
    assert run.series("acc") == [(1, 0.5)]
    ((step, grad_norm),) = run.series("grad_norm")
    assert step == 1 and math.isnan(grad_norm)
    assert not [row for row in run.history if "rank1/loss" in row or "late" in row]


def test_histograms_keep_at_most_512_bins_and_every_count(
    offline_run: tuple[WandbSink, OfflineRun],
) -> None:
    """A 1000-bin histogram is merged to <= 512 bins with its total and range kept."""
    _, run = offline_run
    ((step, weights),) = run.series("weights")
    assert step == 4 and weights["_type"] == "histogram"
    assert len(weights["values"]) <= 512 and len(weights["bins"]) == len(weights["values"]) + 1
    assert sum(weights["values"]) == sum(HIST_COUNTS)
    assert (weights["bins"][0], weights["bins"][-1]) == (HIST_EDGES[0], HIST_EDGES[-1])
    ((_, bias),) = run.series("bias")
    assert (bias["values"], bias["bins"]) == ([1, 2, 3], [0.0, 0.5, 1.0, 1.5])


def test_text_becomes_a_table_of_the_last_200_rows(
    offline_run: tuple[WandbSink, OfflineRun],
) -> None:
    """Text entries accumulate in a (step, text) table that keeps the newest 200 rows."""
    _, run = offline_run
    assert run.table_rows("samples") == [[i, f"line {i}"] for i in range(5, 205)]


def test_image_and_offline_alert_are_logged(offline_run: tuple[WandbSink, OfflineRun]) -> None:
    """An image path becomes a wandb.Image; offline, an alert becomes a table row."""
    _, run = offline_run
    ((step, image),) = run.series("plot")
    assert step == 4 and image["_type"] == "image-file"
    logged = run.run_dir / "files" / image["path"]
    assert logged.read_bytes() == (run.run_dir.parents[1] / "plot.png").read_bytes()
    assert (image["width"], image["height"]) == (4, 3)
    assert run.table_rows(ALERTS_KEY) == [[5, "warning", "loss_spike", "loss x10"]]


def test_config_carries_params_and_run_info(offline_run: tuple[WandbSink, OfflineRun]) -> None:
    """config params, and the command, git commit and host under outrider/."""
    _, run = offline_run
    assert run.config["lr"] == 0.1 and run.config["model"] == {"layers": 4}
    assert run.config["outrider/command"] == "python train.py --lr 0.1"
    assert run.config["outrider/git_commit"] == "abc123"
    assert run.config["outrider/argv"] == "train.py --lr 0.1"
    assert run.config["outrider/host"] == "node-a"
    assert run.config["outrider/python"] == "3.11.7"


def test_run_end_finishes_the_run_with_its_exit_status(
    offline_run: tuple[WandbSink, OfflineRun],
) -> None:
    """run_end puts exit_status in the summary, finishes the run, and later data is dropped."""
    sink, run = offline_run
    assert run.summary["exit_status"] == 3 and run.exit_code == 3
    assert sink.dropped == {"after_run_end": 1}
    assert sink.skipped == 0 and sink.runs == {} and sink.abandoned == 0


def test_ranks_all_prefixes_other_ranks_and_auto_is_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ranks=all logs rank N's data as rank<N>/name; mode auto without a key runs offline."""
    monkeypatch.delenv("WANDB_MODE")
    run_dir = tmp_path / "run-b"
    batches = [
        Batch(source("run-b"), [scalars(1, loss=1.0)], str(run_dir)),
        Batch(
            source("run-b", rank=1, stream="s1"),
            [
                entry("scalars", 1, rank=1, metrics={"loss": 1.5}),
                entry("histogram", 1, rank=1, name="w", counts=[1], edges=[0, 1]),
            ],
            str(run_dir),
        ),
    ]
    sink, _ = run_sink(tmp_path, batches, mode="auto", ranks="all")
    assert sink.mode == "offline"
    run = read_offline_run(run_dir)
    assert run.series("loss") == [(1, 1.0)]
    assert run.series("rank1/loss") == [(1, 1.5)]
    assert run.series("rank1/w")[0][1]["values"] == [1]
    assert run.exit_code == 0  # closed by the agent, no run_end


def test_bad_entries_are_skipped_and_the_rest_kept(tmp_path: Path) -> None:
    """Each bad entry (or bad scalar value) is counted in skipped; its neighbours still arrive."""
    run_dir = tmp_path / "run-c"
    entries = [
        scalars(1, a=1),
        entry("scalars", 1, metrics="not a map"),
        scalars(1, b="abc", c=2),  # b skipped, c kept
        entry("scalars", "seven", metrics={"a": 0}),
        entry("histogram", 1, name="h", counts=[1, 2], edges=[0, 1]),
        entry("histogram", 1, name="h", counts=["NaN"], edges=[0, 1]),
        entry("histogram", 1, name="h", counts=[1, 1], edges=[0, math.nan, 2]),
        entry("histogram", 1, name="h", counts=[1, -1], edges=[0, 1, 2]),
        entry("histogram", 1, name="h", counts=[True], edges=[0, 1]),
        entry("histogram", 1, name="h", counts=[1, 1], edges=[0, 2, 1]),
        scalars(3, d=1.5, **{"": 2.0}),  # plain numbers, one empty name: d kept
        entry("scalars", 4, metrics={"e": 1, 7: 2.0}),  # a name that is no string: e kept
        entry("text", 1, name="t"),
        entry("image", 1, name="i", path="missing.png"),
        entry("alert", 1, name="x", severity="fatal", message="m"),
        entry("config", None, params=[1, 2]),
        entry("heartbeat", None),  # not W&B data: ignored, not skipped
        {"no": "kind"},
        scalars(2, a=2),
    ]
    sink, worker = run_sink(tmp_path, [Batch(source("run-c"), entries, str(run_dir))])
    assert sink.skipped == 15
    assert worker.stats.failures == 0 and worker.stats.exported_entries == len(entries)
    assert entries[0]["metrics"] == {"a": 1}  # entries are every sink's: never changed
    run = read_offline_run(run_dir)
    assert run.series("a") == [(1, 1), (2, 2)]
    assert run.series("c") == [(1, 2)]
    assert run.series("d") == [(3, 1.5)] and run.series("e") == [(4, 1)]
    assert not [row for row in run.history if {"b", "h", "t", "i"} & row.keys()]


def verified(step: int, path: Path, rank: int = 0, **attrs: Any) -> dict[str, Any]:
    """The agent's checkpoint_verified event for a file (as agent/analysis/engine.py stores it)."""
    body = {"path": str(path), "size": path.stat().st_size if path.exists() else 1, **attrs}
    return entry("event", step, rank, name="checkpoint_verified", attrs=body)


def test_verified_checkpoints_become_model_artifacts_when_asked(tmp_path: Path) -> None:
    """checkpoints_as_artifacts: each verified checkpoint is a model artifact with its file,
    step and sha256, aliased latest (and best when the save was the best); a file gone or
    over checkpoint_max_bytes is skipped, counted by reason; other events are not data."""
    run_dir = tmp_path / "run-ckpt"
    folder = tmp_path / "ckpts"
    folder.mkdir()
    small, best, large = (folder / f"ckpt-{n}.pt" for n in (10, 20, 30))
    small.write_bytes(b"a" * 1000)
    best.write_bytes(b"b" * 1500)
    large.write_bytes(b"c" * 5000)
    entries = [
        scalars(10, loss=1.0),
        verified(10, small, sha256="aa"),
        entry("event", 15, name="checkpoint", attrs={"path": str(small)}),
        verified(20, best, sha256="bb", best=True),
        verified(25, folder / "ckpt-25.pt", sha256="cc"),  # deleted since the check
        verified(30, large, sha256="dd"),
    ]
    sink, worker = run_sink(
        tmp_path,
        [Batch(source("run-ckpt"), entries, str(run_dir))],
        checkpoints_as_artifacts=True,
        checkpoint_max_bytes=4096,
    )
    assert worker.stats.failures == 0 and sink.skipped == 0
    assert sink.counters()["checkpoint_artifacts"] == 2
    assert sink.checkpoints_skipped == {"missing": 1, "too_large": 1}
    run = read_offline_run(run_dir)
    assert [(a.name, a.type) for a in run.artifacts] == [("model-run-ckpt", "model")] * 2
    first, second = run.artifacts
    assert first.aliases == ["latest"] and sorted(second.aliases) == ["best", "latest"]
    assert first.metadata == {"step": 10, "size": 1000, "path": str(small), "sha256": "aa"}
    assert second.metadata["step"] == 20 and second.metadata["sha256"] == "bb"
    ((name, (size, staged)),) = second.files.items()
    assert (name, size) == ("ckpt-20.pt", 1500)
    best.unlink()  # rotation deletes the checkpoint: W&B's staged copy is what it uploads
    assert staged.read_bytes() == b"b" * 1500


def test_checkpoints_are_not_artifacts_by_default(tmp_path: Path) -> None:
    """Without checkpoints_as_artifacts a verified checkpoint is not W&B data."""
    run_dir = tmp_path / "run-plain"
    path = tmp_path / "ckpt-1.pt"
    path.write_bytes(b"x" * 10)
    batch = Batch(source("run-plain"), [scalars(1, loss=1.0), verified(1, path)], str(run_dir))
    sink, _ = run_sink(tmp_path, [batch])
    assert "checkpoint_artifacts" not in sink.counters()
    run = read_offline_run(run_dir)
    assert run.series("loss") == [(1, 1.0)] and run.artifacts == []


def test_non_finite_derived_statistics_reach_wandb_in_either_spelling(tmp_path: Path) -> None:
    """Derived statistics stored as "nan"/"inf"/"-inf" (earlier agents) or "NaN"/"Infinity"/
    "-Infinity" (the run store now) are logged as those floats, none skipped."""
    run_dir = tmp_path / "run-d"
    spellings = {
        10: {"nan": math.nan, "inf": math.inf, "-inf": -math.inf},
        11: {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf},
    }
    agent = Source("run-d", schema.AGENT_STREAM, 0, -1, 0, "node-a", 1234)
    stored = [
        entry("scalars", step, metrics={f"features/h/stat_{i}": s for i, s in enumerate(spelling)})
        for step, spelling in spellings.items()
    ]
    sink, _ = run_sink(tmp_path, [Batch(agent, stored, str(run_dir))])
    assert sink.skipped == 0
    run = read_offline_run(run_dir)
    for i in range(3):
        logged = run.series(f"features/h/stat_{i}")
        assert [step for step, _ in logged] == [10, 11]
        for step, value in logged:
            expected = list(spellings[step].values())[i]
            assert math.isnan(value) if math.isnan(expected) else value == expected


def test_rows_per_second_folds_steps_into_fewer_rows_and_keeps_every_metric(
    tmp_path: Path,
) -> None:
    """rows_per_second=1, 30 steps arriving within a fraction of a second: W&B gets far fewer
    rows than steps; each row holds every metric's latest value at the latest step, a value
    logged only once (a histogram step) is not lost, and the last step is always logged."""
    run_dir = tmp_path / "run-f"
    entries = [scalars(step, loss=1.0 / (step + 1)) for step in range(30)]
    entries.insert(10, entry("histogram", 9, name="w", counts=[1, 2], edges=[0.0, 0.5, 1.0]))
    entries.insert(21, scalars(19, layer_norm=3.0))
    batches = [Batch(source("run-f"), [e], str(run_dir)) for e in entries]
    run_sink(tmp_path, batches, rows_per_second=1)
    run = read_offline_run(run_dir)
    losses = run.series("loss")
    assert 1 <= len(losses) <= 3 < 30
    assert losses[-1] == (29, 1.0 / 30)
    steps = [step for step, _ in losses]
    assert steps == sorted(steps)
    for step, value in losses:  # each row: the latest loss at its step
        assert value == 1.0 / (step + 1)
    ((hist_step, hist),) = run.series("w")
    assert hist["values"] == [1, 2] and hist_step in steps
    ((_, norm),) = run.series("layer_norm")
    assert norm == 3.0


def test_offline_runs_are_written_from_the_run_store_at_their_end(tmp_path: Path) -> None:
    """By default an offline run costs nothing while it goes: no W&B run (and no W&B
    service) until its run_end; then the run is written from its stored lines, rows folded
    by the records' own times, the agent's lines stored after the run_end included."""
    run_dir = tmp_path / "run-s"
    run_dir.mkdir()
    (run_dir / "run.json").write_text(json.dumps({"run_id": "run-s", "host": "node-a"}))
    trainer = source("run-s")
    first = {**scalars(0, loss=1.0), "t": 1000.0, "source": dataclasses.asdict(trainer)}
    stored = [first] + [
        {**scalars(step, loss=1.0 / (step + 1)), "t": 1000.0 + 0.5 * step} for step in range(1, 100)
    ]
    run_end = entry("run_end", None, rank=-1, exit_status=0)
    after = {**scalars(99, **{"window/steps_per_second": 2.0}), "stream": "agent", "rank": 0}
    lines = [*stored, run_end, after]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    sink = WandbSink(WandbSink.Options(rows_per_second=0.2), SinkContext(tmp_path))
    worker = SinkWorker(sink, flush_interval=0.05)
    worker.submit(Batch(trainer, stored, str(run_dir)))
    wait_for(lambda: worker.snapshot().exported_batches == 1, 30, "the batch taken")
    sink.flush(1.0)  # the worker's periodic flush, at once
    assert sink.runs == {} and not (run_dir / "wandb").exists()
    worker.submit(Batch(source("run-s", rank=-1, stream="launcher"), [run_end], str(run_dir)))
    assert worker.close(timeout=60), "the wandb sink did not close"
    run = read_offline_run(run_dir)
    losses = run.series("loss")
    assert 9 <= len(losses) <= 12  # 49.5 s of records at a row per 5 s
    assert losses[-1] == (99, 1.0 / 100)
    assert [step for step, _ in losses] == sorted(step for step, _ in losses)
    assert run.series("window/steps_per_second") == [(99, 2.0)]
    assert run.exit_code == 0


def test_without_a_launcher_a_deferred_run_is_written_once_every_stream_said_bye(
    tmp_path: Path,
) -> None:
    """Trainers sending to a long-lived agent have no launcher to send a run_end: the run
    is written when its last stream says bye, not when the agent stops."""
    run_dir = tmp_path / "run-b"
    run_dir.mkdir()
    ranks = [source("run-b", rank=rank, stream=f"s{rank}") for rank in (0, 1)]
    lines = {
        rank: [
            {**scalars(0, rank=rank, loss=1.0), "source": dataclasses.asdict(ranks[rank])},
            {**entry("bye", None, rank=rank), "stream": f"s{rank}"},
        ]
        for rank in (0, 1)
    }
    stored = [*lines[0], *lines[1]]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in stored))
    sink = WandbSink(WandbSink.Options(rows_per_second=0), SinkContext(tmp_path))
    worker = SinkWorker(sink, flush_interval=0.05)
    try:
        worker.submit(Batch(ranks[0], lines[0], str(run_dir)))
        wait_for(lambda: worker.snapshot().exported_batches == 1, 30, "rank 0's batch")
        assert "run-b" not in sink.ended  # rank 1 has not said bye
        worker.submit(Batch(ranks[1], lines[1], str(run_dir)))
        wait_for(lambda: "run-b" in sink.ended, 60, "the run written at the last bye")
    finally:
        assert worker.close(timeout=60), "the wandb sink did not close"
    assert read_offline_run(run_dir).series("loss") == [(0, 1.0)]


def test_a_hanging_finish_is_abandoned_within_finish_timeout(tmp_path: Path) -> None:
    """close() gives every run finish_timeout in all (in parallel), then abandons it."""
    options = WandbSink.Options(finish_timeout=1.0, offline_at_end=False)
    sink = WandbSink(options, SinkContext(tmp_path))
    worker = SinkWorker(sink, flush_interval=0.2)
    names = ("run-h1", "run-h2", "run-h3")
    for name in names:
        worker.submit(Batch(source(name), [scalars(1, x=1.0)], str(tmp_path / name)))
    wait_for(lambda: len(sink.runs) == len(names), 30, "the W&B runs to start")
    release = threading.Event()
    runs = [state.run for state in sink.runs.values()]
    real_finishes = [run.finish for run in runs]

    def stuck(*args: Any, **kwargs: Any) -> None:
        """A stuck upload, which the real library cannot produce on demand."""
        release.wait(60)

    for run in runs:
        run.finish = stuck  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        assert worker.close(timeout=30)
        elapsed = time.monotonic() - started
        assert sink.abandoned == len(names)
        assert 1.0 <= elapsed < 2.5, f"close took {elapsed:.1f} s for 3 runs of 1 s at most each"
    finally:
        release.set()
        for finish in real_finishes:
            finish()


UNREACHABLE_SERVER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from sinks.base import Batch, Source
from sinks.wandb import WandbSink
from sinks.worker import SinkWorker
sink = WandbSink(WandbSink.Options(mode="online", init_timeout=2, finish_timeout=2))
worker = SinkWorker(sink)
entry = {"kind": "scalars", "step": 1, "rank": 0, "t": 0.0, "stream": "s", "seq": 0,
         "metrics": {"x": 1}}
worker.submit(Batch(Source("run-e", "s", 0, 0, 1, "h", 1), [entry], sys.argv[2]))
deadline = time.monotonic() + 30
while not sink.failed and time.monotonic() < deadline:
    time.sleep(0.05)
closed = worker.close(5)
print(json.dumps({"closed": closed, "failed": list(sink.failed), "dropped": sink.dropped}))
"""


def test_unreachable_server_costs_the_run_not_the_agent(tmp_path: Path) -> None:
    """Online with no server: init gives up after init_timeout, the agent closes and exits."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, WANDB_API_KEY="c" * 40, WANDB_BASE_URL=f"http://127.0.0.1:{port}")
    env.pop("WANDB_MODE")
    env.pop("WANDB_SERVICE", None)  # this process's wandb-core: the child must start its own
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-P", "-c", UNREACHABLE_SERVER, str(REPO), str(tmp_path / "run-e")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"closed": True, "failed": ["run-e"], "dropped": {"init_failed": 1}}
    assert elapsed < 30, f"the process took {elapsed:.0f} s to exit"


def test_auto_mode_follows_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """auto: WANDB_MODE wins; else online with WANDB_API_KEY or a netrc entry, else offline."""
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.test")
    assert resolve_mode("auto") == "offline"
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine wandb.example.test login user password {'a' * 40}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("NETRC", str(tmp_path / "absent"))
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert resolve_mode("auto") == "online"


def test_disabled_mode_writes_nothing(tmp_path: Path) -> None:
    """mode=disabled takes every batch and creates no W&B run."""
    batch = Batch(source("run-d"), [scalars(1, x=1.0)], str(tmp_path / "run-d"))
    _, worker = run_sink(tmp_path, [batch], mode="disabled")
    assert worker.stats.exported_entries == 1 and not list(tmp_path.rglob("*.wandb"))


def test_options_are_checked_through_the_registry(tmp_path: Path) -> None:
    """Unknown options and over-512 bins are config errors; ranks: 0 reads as "0"."""
    with pytest.raises(registry.SinkConfigError, match="histogram_bins"):
        registry.validate_options("wandb", {"histogram_bins": 1000})
    with pytest.raises(registry.SinkConfigError, match="projekt"):
        registry.validate_options("wandb", {"projekt": "x"})
    sink = registry.create("wandb", {"ranks": 0, "tags": ["a"]}, SinkContext(tmp_path))
    assert isinstance(sink, WandbSink) and sink.options.ranks == "0"


def test_helpers_merge_bins_and_sanitise_run_ids() -> None:
    """Bins merge in adjacent runs keeping totals; run ids become [A-Za-z0-9_-]{1,64}, distinct."""
    counts, edges = merge_bins([1.0] * 1025, list(range(1026)), 512)
    assert len(counts) == 342 and sum(counts) == 1025 and len(edges) == 343
    assert edges[-1] == 1025 and all(a < b for a, b in itertools.pairwise(edges))
    assert wandb_run_id("run-1_x") == "run-1_x"
    assert wandb_run_id("a.b") != wandb_run_id("a-b")
    long = wandb_run_id("r" * 128)
    assert len(long) == 64 and long.startswith("rrr")


def test_import_is_lazy_and_finds_the_real_wandb(offline_run: tuple[WandbSink, OfflineRun]) -> None:
    """`import sinks.wandb` does not import wandb; the name resolves to the real package."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import sinks, sinks.wandb;"
        "assert 'wandb' not in sys.modules, 'wandb imported at import time'"
    )
    subprocess.run([sys.executable, "-P", "-c", code, str(REPO)], check=True, timeout=60)
    wandb = sys.modules["wandb"]  # imported by the sink in the fixture
    assert wandb.__file__ is not None and hasattr(wandb, "init")
    assert Path(wandb.__file__).parent != REPO / "sinks" and "site-packages" in wandb.__file__
    assert os.path.basename(wandb.__file__) == "__init__.py"
