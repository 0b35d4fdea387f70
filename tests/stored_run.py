"""A small training run stored by a real agent from a real probe, for the tests that read
runs back (export, the dashboard)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import run_trainer, short_ipc_endpoint, start_agent, stop_agent

STEPS = 120
VAL_EVERY = 20
NAN_STEP = 60

TRAINER = f"""
import probe
probe.init()
probe.config({{"lr": 1e-3}})
for step in range({STEPS}):
    loss = float("nan") if step == {NAN_STEP} else 3.0 - step * 0.01
    probe.log({{"loss": loss, "lr": 1e-3 * (1 + step % 3)}}, step=step)
    if step % {VAL_EVERY} == 0:
        probe.log({{"val/loss": 2.5 - step * 0.005}}, step=step)
probe.text("sample", "the quick brown fox", step={STEPS - 1})
assert probe.finish(10.0)
"""


def loss_at(step: int) -> float:
    return float("nan") if step == NAN_STEP else 3.0 - step * 0.01


def store_runs(runs_dir: Path, *run_ids: str) -> None:
    """Store one run of ``STEPS`` steps per id (loss, lr, val/loss, a NaN loss at ``NAN_STEP``)
    through one real agent, which is stopped afterwards (the runs are finished)."""
    endpoint = short_ipc_endpoint()
    agent = start_agent(endpoint, runs_dir, "--config", str(_quiet_config(runs_dir)))
    try:
        for run_id in run_ids:
            done = run_trainer(TRAINER, endpoint, run_id)
            assert done.returncode == 0, done.stderr
    finally:
        assert stop_agent(agent) == 0


def _quiet_config(runs_dir: Path) -> Path:
    """No statistics workers or host sampling: only what the trainer logged is stored."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir.parent / "quiet-agent.yaml"
    path.write_text("stats:\n  enabled: false\nsystem:\n  enabled: false\n")
    return path
