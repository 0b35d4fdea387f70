"""``OutriderTracker`` in a real ``accelerate.Accelerator``: a small model trained a few
CPU steps, logged with ``accelerator.log``, read back from a real agent process."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.tracking import LOGGER_TYPE_TO_CLASS
from torch import nn

import probe
from probe.integrations.accelerate import OutriderTracker
from tests.helpers import lines, run_info, stop_agent
from tests.host_reads import recording_host_reads
from tests.probe.test_watch import batch, close, mlp

STEPS = 4
MAX_NORM = 0.05


def stored(agent: Any, runs_dir: Path, run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    probe.finish()
    assert stop_agent(agent) == 0
    return lines(runs_dir / run_id), run_info(runs_dir / run_id)


def fit(accelerator: Accelerator, watch: bool) -> list[dict[str, float]]:
    """The loop of accelerate's examples: prepare, backward, clip, step, log; returns the
    loss and the pre-clip gradient norm of each step, read after the step for the test."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    if watch:
        probe.watch(model, optimizer, layer_every=2, hist_every=2)
    seen = []
    for step in range(STEPS):
        x, y = batch(step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        accelerator.log({"loss": loss.detach(), "grad_norm_clipped": grad_norm}, step=step)
        seen.append({"loss": loss.detach(), "grad_norm": grad_norm})
    accelerator.end_training()
    return [{k: float(v) for k, v in numbers.items()} for numbers in seen]


def test_tracker_instance_logs_config_scalars_text_and_watch(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """Accelerator(log_with=[OutriderTracker()]): the config from init_trackers, each
    accelerator.log at its step (tensors included, a map as name/key, a string as text),
    and the watcher's pre-clip grad_norm through accelerate's wrapped optimizer."""
    probe.init(endpoint, run_id="acc")
    accelerator = Accelerator(cpu=True, log_with=[OutriderTracker()])
    accelerator.init_trackers("tiny-mlp", config={"lr": 0.05, "layers": (8, 16, 1)})
    accelerator.log({"note": "warm start", "eval": {"loss": 2.5, "accuracy": 0.5}}, step=0)
    seen = fit(accelerator, watch=True)
    entries, info = stored(agent, runs_dir, "acc")

    # accelerate passes the project name only to trackers it makes itself (by name)
    assert info["config"] == {"lr": 0.05, "layers": [8, 16, 1]}
    texts = [(e["step"], e["name"], e["text"]) for e in entries if e["kind"] == "text"]
    assert texts == [(0, "note", "warm start")]
    logged = [(e["step"], e["metrics"]) for e in entries if e["kind"] == "scalars"]
    assert (0, {"eval/loss": 2.5, "eval/accuracy": 0.5}) in logged
    for step, numbers in enumerate(seen):
        ours = [m for s, m in logged if s == step and "grad_norm_clipped" in m]
        assert len(ours) == 1, step
        assert close(ours[0]["loss"], numbers["loss"]), step
        assert close(ours[0]["grad_norm_clipped"], numbers["grad_norm"]), step
        assert numbers["grad_norm"] > MAX_NORM, "the loop must clip"
        watched = [m for s, m in logged if s == step and "lr" in m]
        assert len(watched) == 1, step
        # accelerate returns the pre-clip norm; the watcher logs the same one.
        assert close(watched[0]["grad_norm"], numbers["grad_norm"]), step
        assert ("param_norm" in watched[0]) == (step % 2 == 0), step


def test_tracker_by_name(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """Importing the module registers "outrider" with accelerate's registry, so
    log_with="outrider" works, with init_kwargs going to probe.init."""
    assert LOGGER_TYPE_TO_CLASS["outrider"] is OutriderTracker
    accelerator = Accelerator(cpu=True, log_with="outrider")
    accelerator.init_trackers(
        "by-name",
        config={"batch_size": 8},
        init_kwargs={"outrider": {"endpoint": endpoint, "run_id": "named"}},
    )
    tracker = accelerator.get_tracker("outrider")
    assert isinstance(tracker, OutriderTracker) and tracker.tracker is probe
    accelerator.log({"loss": 1.5}, step=3)
    accelerator.end_training()
    entries, info = stored(agent, runs_dir, "named")
    assert info["config"] == {"project_name": "by-name", "batch_size": 8}
    assert [(e["step"], e["metrics"]) for e in entries if e["kind"] == "scalars"] == [
        (3, {"loss": 1.5, "loss_nonfinite": 0})
    ]


def test_no_host_reads_are_added(agent: Any, endpoint: str, runs_dir: Path) -> None:
    """The training thread makes the same .item()/float()/.cpu() reads in the loop with the
    tracker and probe.watch as without them; differences are listed."""
    probe.init(endpoint, run_id="reads")
    recorded = {}
    for name, trackers, watch in (
        ("warm-up", [], False),
        ("without", [], False),
        ("with", [OutriderTracker()], True),
    ):
        accelerator = Accelerator(cpu=True, log_with=trackers or None)
        accelerator.init_trackers("reads", config={"lr": 0.05})
        with recording_host_reads(source=None) as reads:
            run_loop(accelerator, watch)
        recorded[name] = Counter(reads.seen)
    added = recorded["with"] - recorded["without"]
    missing = recorded["without"] - recorded["with"]
    assert not added and not missing, f"added: {dict(added)}\nmissing: {dict(missing)}"
    assert recorded["without"], "the loop's own read (its mean loss .item()) must be seen"
    entries, _ = stored(agent, runs_dir, "reads")
    scalars = [e["metrics"] for e in entries if e["kind"] == "scalars"]
    assert sum("loss" in m for m in scalars) == STEPS, "the tracker logged every step"
    assert sum("train_loss" in m for m in scalars) == 1
    assert sum("grad_norm" in m for m in scalars) == STEPS, "the loop was watched"


def run_loop(accelerator: Accelerator, watch: bool) -> None:
    """``fit`` without the test's reads after each step; like accelerate's examples, the
    mean loss is read once at the end (the trainer's own read, in both runs)."""
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = accelerator.prepare(model, optimizer)
    if watch:
        probe.watch(model, optimizer, layer_every=1, hist_every=1, activations_every=1)
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        accelerator.log({"loss": loss.detach()}, step=step)
        losses.append(loss.detach())
    accelerator.log({"train_loss": torch.stack(losses).mean().item()}, step=STEPS)
    accelerator.end_training()


def test_tracker_arguments_are_checked() -> None:
    """A negative flush timeout is a ValueError when the tracker is made."""
    with pytest.raises(ValueError, match="flush_timeout"):
        OutriderTracker(flush_timeout=-1)
