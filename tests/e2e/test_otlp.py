"""The demo trainer under `outrider run --sinks otlp`: its loss reaches a real OTLP receiver."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest

from tests.helpers import OUTRIDER, PYTHON, REPO, clean_env, lines, run_info
from tests.otlp_receiver import OTLPReceiver

DEMO = REPO / "examples" / "train_charlm.py"
SMALL_DEMO = [
    "--steps", "200", "--layers", "1", "--d-model", "32", "--heads", "2", "--context", "32",
    "--batch-size", "8", "--data-bytes", "200000", "--eval-every", "100", "--sample-every", "200",
    "--print-every", "100",
]  # fmt: skip


@pytest.mark.slow
def test_demo_run_loss_reaches_the_otlp_receiver(tmp_path: Path) -> None:
    """Every push carries the rank's last loss; the one at exit is the run's last loss."""
    receiver = OTLPReceiver()
    config = tmp_path / "agent.yaml"
    config.write_text(f"sinks:\n  otlp: {{endpoint: '{receiver.url}', export_interval: 0.5}}\n")
    runs = tmp_path / "runs"
    try:
        done = subprocess.run(
            [OUTRIDER, "run", "--runs-dir", str(runs), "--run-id", "demo", "--config",
             str(config), "--sinks", "otlp", "--", PYTHON, str(DEMO), *SMALL_DEMO],
            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    finally:
        receiver.stop()
    assert done.returncode == 0, done.stderr

    run_dir = runs / "demo"
    stored = [e for e in lines(run_dir) if "loss" in e.get("metrics", {})]
    assert len(stored) == 200
    info = run_info(run_dir)
    assert set(info["agent"]["sinks"]) == {"otlp"}
    sink = info["agent"]["sinks"]["otlp"]
    assert sink["health"] == "closed" and sink["failures"] == 0, sink
    attributes = {"run": "demo", "rank": 0, "host": socket.gethostname()}
    losses = [p for p in receiver.points() if p.name == "outrider.loss"]
    assert losses and {tuple(sorted(p.attributes)) for p in losses} == {("host", "rank", "run")}
    assert receiver.latest("outrider.loss", **attributes) == stored[-1]["metrics"]["loss"]
    assert receiver.latest("outrider.step", **attributes) == stored[-1]["step"]
    stored_losses = {e["metrics"]["loss"] for e in stored}
    assert {p.value for p in losses} <= stored_losses
    assert losses[0].resource["service.name"] == "outrider"
