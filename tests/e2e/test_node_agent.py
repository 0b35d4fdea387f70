"""A long-lived node agent (systemd, a DaemonSet) exports host series with no run open.

Like a DCGM exporter, a real `outrider agent` started with no trainer serves
its host's (and GPUs') gauges on /metrics at once, keeps them fresh after a
run has ended, and stores nothing for them in any run.
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import lines, run_trainer, short_ipc_endpoint, start_agent, stop_agent, wait_for
from tests.prometheus_server import free_port

NODE = "node-7"
TRAINER = """
import probe
probe.init()
for step in range(5):
    probe.log({"loss": 1.0 / (step + 1)}, step=step)
probe.finish()
"""

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Series:
    """Every sample on the agent's /metrics, by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def host_series(series: Series) -> set[str]:
    return {name for name, labels in series if name.startswith("outrider_host_") and labels}


def exported(port: int) -> float:
    """Entries the prometheus sink has exported: between runs, one per host sample."""
    key = ("outrider_sink_exported_entries_total", (("sink", "prometheus"),))
    return scrape(port).get(key, 0.0)


def system_lines(run_dir: Path) -> int:
    return sum(1 for e in lines(run_dir, agent_lines=True) if e["kind"] == "system")


@pytest.mark.slow
def test_node_agent_exports_host_series_with_no_run_and_after_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No trainer: host series within seconds, labelled with OUTRIDER_HOST; after a run ended
    they stay fresh (past stale_after_seconds) and no system sample goes to its store."""
    monkeypatch.setenv("OUTRIDER_HOST", NODE)  # as the DaemonSet sets it from spec.nodeName
    port = free_port()
    config = tmp_path / "agent.yaml"
    config.write_text(
        "system: {interval: 0.2}\n"
        f"sinks:\n  prometheus: {{port: {port}, stale_after_seconds: 2}}\n"
    )
    runs = tmp_path / "runs"
    endpoint = short_ipc_endpoint()
    agent = start_agent(endpoint, runs, "--config", str(config), sinks="prometheus")
    try:
        found = wait_for(lambda: host_series(scrape(port)), 10, "host series with no run open")
        assert {"outrider_host_cpus", "outrider_host_memory_total_bytes"} <= found
        series = scrape(port)
        assert series[("outrider_host_cpus", (("host", NODE),))] >= 1
        assert not runs.exists() or not any(runs.iterdir()), "a run store without a run"

        done = run_trainer(TRAINER, endpoint, "short")
        assert done.returncode == 0, done.stderr
        run_dir = runs / "short"
        wait_for(lambda: any(e["kind"] == "bye" for e in lines(run_dir)), 20, "the trainer's bye")
        step = ("outrider_step", (("host", NODE), ("rank", "0"), ("run", "short")))
        wait_for(lambda: scrape(port).get(step) == 4, 10, "the rank's last step on /metrics")

        # The run is over for the agent once its only stream said bye: samples after that
        # are exported and not stored. Three samples in, the store's count is final.
        start = exported(port)
        wait_for(lambda: exported(port) >= start + 3, 10, "three host samples after the bye")
        stored = system_lines(run_dir)
        later = exported(port)
        wait_for(lambda: exported(port) >= later + 15, 20, "three seconds of host samples")
        assert system_lines(run_dir) == stored
        # 3 s > stale_after_seconds: series that were not refreshed would be gone by now
        assert {"outrider_host_cpus", "outrider_host_load1"} <= host_series(scrape(port))
    finally:
        assert stop_agent(agent, timeout=60) == 0
