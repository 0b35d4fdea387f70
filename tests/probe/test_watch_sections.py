"""probe.watch's section times, forward_seconds and backward_seconds: real agent, real DDP.

Only lower bounds that a sleep guarantees are asserted, and comparisons of medians where
one side sleeps 30 ms more than the other; never a speed.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import probe
from tests.helpers import lines, stop_agent
from tests.probe.test_watch import batch, by_step, stored_run


class Sleepy(nn.Module):
    """A small MLP whose forward sleeps ``delay`` seconds while grad is on, ``eval_delay`` off."""

    def __init__(self, delay: float = 0.0, eval_delay: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        self.delay, self.eval_delay = delay, eval_delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay if torch.is_grad_enabled() else self.eval_delay)
        return self.body(x)


def test_forward_and_backward_seconds_hold_their_sections(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """A 20 ms sleep in forward shows in forward_seconds; 15 ms between backward and step in
    backward_seconds; a 300 ms no_grad evaluation forward is in neither."""
    probe.init(endpoint, run_id="sections")
    model = Sleepy(delay=0.02, eval_delay=0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.watch(model, opt)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        time.sleep(0.015)
        if step == 1:
            with torch.no_grad():
                model(x)
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, "sections")[0])
    for step in range(4):
        assert steps[step]["forward_seconds"] >= 0.02, step
        assert steps[step]["backward_seconds"] >= 0.015, step
    assert steps[1]["forward_seconds"] < 0.3  # the evaluation forward is not counted
    assert steps[1]["backward_seconds"] < 0.3


def test_accumulated_forwards_add_up_and_stay_out_of_backward(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """4 micro-batches of a 50 ms forward: forward_seconds >= 200 ms; backward_seconds does
    not hold the 150 ms of forwards between the first backward and the step."""
    probe.init(endpoint, run_id="micro")
    model = Sleepy(delay=0.05)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.watch(model, opt)
    for step in range(2):
        opt.zero_grad()
        for micro in range(4):
            x, y = batch(10 * step + micro)
            (nn.functional.mse_loss(model(x), y) / 4).backward()
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, "micro")[0])
    assert sorted(steps) == [0, 1]
    for step in (0, 1):
        assert steps[step]["forward_seconds"] >= 0.2
        assert 0 < steps[step]["backward_seconds"] < 0.15


def test_a_dict_output_and_an_output_changed_in_place(
    agent: Any, endpoint: str, runs_dir: Path
) -> None:
    """The backward is seen through a mapping's first grad tensor; masking logits in place
    (which a module's full backward hook would forbid) still works."""

    class Heads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"ids": torch.arange(2), "logits": self.linear(x)}

    probe.init(endpoint, run_id="mapping")
    model = Heads()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    probe.watch(model, opt)
    for step in range(2):
        x, _ = batch(step)
        opt.zero_grad()
        logits = model(x)["logits"]
        logits[:, 0] = -1e4  # in place, as masking code does
        logits.logsumexp(dim=1).mean().backward()
        opt.step()
    steps = by_step(stored_run(agent, runs_dir, "mapping")[0])
    assert all({"forward_seconds", "backward_seconds"} <= set(steps[s]) for s in (0, 1))


DDP_TRAINER = """\
import time
import torch
import torch.distributed as dist
from torch import nn
import probe

dist.init_process_group("gloo")
rank = dist.get_rank()
assert probe.init()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 1))

    def forward(self, x):
        if rank == 1:
            time.sleep(0.03)  # the straggler
        return self.body(x)


model = nn.parallel.DistributedDataParallel(Net())
opt = torch.optim.SGD(model.parameters(), lr=0.01)
probe.watch(model, opt)
torch.manual_seed(rank)
for step in range(12):
    x = torch.randn(16, 32)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_straggler_forwards_longer_and_the_other_rank_waits_in_backward(
    agent: Any, endpoint: str, runs_dir: Path, tmp_path: Path
) -> None:
    """2 gloo ranks under torchrun, rank 1 sleeping 30 ms per forward: rank 1's forward is
    longer, and rank 0's backward is longer (it waits for rank 1 in the all-reduce)."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_TRAINER)
    env = dict(
        os.environ,
        OUTRIDER_ENDPOINT=endpoint,
        OUTRIDER_RUN_ID="ddp-sections",
        OUTRIDER_PROBE_RAISE="1",
        OMP_NUM_THREADS="1",
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    done = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", str(script)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert stop_agent(agent) == 0
    stored = lines(runs_dir / "ddp-sections")
    medians: dict[tuple[int, str], float] = {}
    for rank in (0, 1):
        records = [x["metrics"] for x in stored if x["kind"] == "scalars" and x["rank"] == rank]
        for name in ("forward_seconds", "backward_seconds"):
            values = [m[name] for m in records if name in m]
            assert len(values) == 12, (rank, name)
            medians[(rank, name)] = statistics.median(values[2:])  # past the first steps
    assert medians[(1, "forward_seconds")] >= 0.03
    assert medians[(1, "forward_seconds")] > medians[(0, "forward_seconds")] + 0.02
    assert medians[(0, "backward_seconds")] > medians[(1, "backward_seconds")] + 0.015
