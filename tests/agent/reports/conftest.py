"""Stored runs made by a real agent from real trainers, shared by the report tests."""

from __future__ import annotations

import concurrent.futures
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import run_trainer, short_ipc_endpoint, start_agent, stop_agent

#: a trainer whose every value is known from its step: loss falls, then jumps at the last
#: step (so best and final differ), accuracy rises, lr and the config come from the run
TRAIN = """\
import time
import probe

probe.init()
LR, STEPS = {lr}, {steps}
probe.config({{"lr": LR, "optimizer": {{"name": "adamw", "betas": [0.9, 0.95]}}, "steps": STEPS}})
for step in range(STEPS):
    loss = 2.0 / (step + 1) + LR + (0.5 if step == STEPS - 1 else 0.0)
    probe.log({{"loss": loss, "grad_norm": 1.0 + step % 3, "val/acc": step / STEPS, "lr": LR}},
              step=step)
    time.sleep(0.002)
probe.finish()
"""

RUNS = {"lr-small": (0.01, 40), "lr-large": (0.1, 30)}


def expected_loss(run: str, step: int) -> float:
    lr, steps = RUNS[run]
    return 2.0 / (step + 1) + lr + (0.5 if step == steps - 1 else 0.0)


@pytest.fixture(scope="session")
def stored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two finished runs, ``lr-small`` and ``lr-large``, trained side by side under one
    real agent."""
    base = tmp_path_factory.mktemp("stored")
    runs_dir = base / "runs"
    endpoint = short_ipc_endpoint()
    agent = start_agent(endpoint, runs_dir)
    try:
        with concurrent.futures.ThreadPoolExecutor(len(RUNS)) as pool:
            trainers = [
                pool.submit(run_trainer, TRAIN.format(lr=lr, steps=steps), endpoint, run_id)
                for run_id, (lr, steps) in RUNS.items()
            ]
            for trainer in trainers:
                done = trainer.result()
                assert done.returncode == 0, done.stderr
    finally:
        assert stop_agent(agent) == 0
        shutil.rmtree(Path(endpoint.removeprefix("ipc://")).parent, ignore_errors=True)
    return {"runs": runs_dir, "base": base}
