"""The demo trainer under `outrider run` with every default sink, checked by the real readers.

A real Prometheus server scrapes the live agent during the run; afterwards
TensorBoard's reader and the offline W&B log must hold what the run store
holds.
"""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import OUTRIDER, PYTHON, REPO, clean_env, lines, run_info
from tests.prometheus_server import dashboard_exprs, free_port, poll, promtool, start_prometheus
from tests.wandb_reader import read_offline_run

DEMO = REPO / "examples" / "train_charlm.py"
SMALL_DEMO = [
    "--steps", "400", "--layers", "1", "--d-model", "32", "--heads", "2", "--context", "32",
    "--batch-size", "8", "--data-bytes", "200000", "--eval-every", "100", "--sample-every", "200",
    "--print-every", "100",
]  # fmt: skip

# Panels that are empty when nothing is wrong: no drops, no alerts, no GPU.
QUIET_WHEN_HEALTHY = {"Probe drops and losses", "Active alerts"}
# The scrapes and the dashboard's queries need the run alive: the tiny demo's 400 steps take
# 1.5 s on a fast machine, so it trains until a wall-clock limit instead, and at least 400
# steps on a slow or busy one.
LIVE_FOR = ["--steps", "1000000", "--max-seconds", "12", "--min-steps", "400"]


@pytest.mark.slow
@pytest.mark.serial
def test_demo_run_reaches_every_default_sink(tmp_path: Path) -> None:
    """Prometheus scrapes the live run; TensorBoard and W&B hold what metrics.jsonl holds."""
    port = free_port()
    config = tmp_path / "agent.yaml"
    # Every W&B step, so W&B can be compared with the store step by step (the default folds).
    config.write_text(
        f"sinks:\n  prometheus: {{port: {port}}}\n  tensorboard: {{flush_secs: 1}}\n"
        "  wandb: {rows_per_second: 0}\n"
    )
    prometheus = start_prometheus(tmp_path / "prometheus", [f"127.0.0.1:{port}"])
    runs = tmp_path / "runs"
    env = clean_env(WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("OUTRIDER_SINKS")  # the defaults, this time
    env.pop("WANDB_API_KEY", None)
    env.pop("GOMAXPROCS", None)
    for name in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        env[name] = str(tmp_path / "wandb-home")
    launcher = subprocess.Popen(
        [OUTRIDER, "run", "--runs-dir", str(runs), "--run-id", "demo", "--config", str(config),
         "--", PYTHON, str(DEMO), *SMALL_DEMO, *LIVE_FOR],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        poll(lambda: prometheus.query('outrider_loss{run="demo"}'), 60, "loss in Prometheus")
        # No W&B service beside the trainer: an offline run is written at its end.
        tree = psutil.Process(launcher.pid).children(recursive=True)
        assert [p for p in tree if p.name() == "wandb-core"] == []
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            exposition = reply.read().decode()
        check = promtool("check", "metrics", stdin=exposition)
        assert check.returncode == 0 and not check.stdout.strip(), check.stdout + check.stderr
        poll(lambda: prometheus.query("rate(outrider_agent_records_received_total[1m]) > 0"),
             30, "two scrapes of the agent's counters")  # fmt: skip

        # Every query must be accepted; every panel needs data from at least one of its
        # queries (tokens/s or samples/s), except GPU panels here and the quiet ones. Asked
        # until they all have it: a scrape can catch step 0's loss before step 1 brings the
        # first step time.
        def every_panel_has_data() -> bool:
            has_data: dict[str, bool] = {}
            for title, expr, requires_gpu in dashboard_exprs():
                result = prometheus.query(expr)  # raises unless Prometheus accepts it
                if not requires_gpu and title not in QUIET_WHEN_HEALTHY:
                    has_data[title] = has_data.get(title, False) or bool(result)
            blank = sorted(title for title, data in has_data.items() if not data)
            assert not blank, f"dashboard panels without data during the run: {blank}"
            return True

        poll(every_panel_has_data, 30, "data in every dashboard panel", interval=0.5)
    finally:
        _, err = launcher.communicate(timeout=300)
        prometheus.stop()
    assert launcher.returncode == 0, err
    assert "TensorBoard: tensorboard --logdir" in err and "wandb sync" in err

    run_dir = runs / "demo"
    stored = lines(run_dir)
    losses = [(e["step"], e["metrics"]["loss"]) for e in stored if "loss" in e.get("metrics", {})]
    assert len(losses) >= 400
    assert [step for step, _ in losses] == list(range(len(losses)))
    info = run_info(run_dir)
    assert info["status"] == "finished" and info["lost"] == 0 and info["dropped"] == 0
    assert {s["health"] for s in info["agent"]["sinks"].values()} == {"closed"}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(
        str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0}
    )
    events.Reload()
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in events.Scalars("loss")] == losses
    assert "samples/generation" in events.Tags()["tensors"]

    offline = read_offline_run(run_dir)
    assert offline.run_id == "demo"
    wandb_losses = offline.series("loss")
    assert [(s, pytest.approx(v, rel=1e-9)) for s, v in wandb_losses] == losses
    assert offline.config.get("lr") == pytest.approx(3e-3)
    assert os.path.isdir(run_dir / "wandb")
