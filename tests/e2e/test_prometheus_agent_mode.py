"""Many nodes on engines people run: Prometheus agent mode and federation, real servers.

A real `outrider agent` (prometheus sink) receives two ranks of a short real
trainer. A Prometheus in agent mode, configured from a generated copy of
deploy/prometheus/agent-mode.yml, scrapes it and remote-writes into a second
Prometheus with the remote-write receiver on (deploy/prometheus/central.yml);
the dashboard's PromQL, variables filled in, must find every rank there with
its host. Then federation.yml: a central Prometheus federating from a
scraping one must hold the outrider series, and only those.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import PYTHON, lines, short_ipc_endpoint, start_agent, stop_agent, wait_for
from tests.prometheus_server import (
    ALERT_RULES,
    REPO,
    PrometheusServer,
    dashboard_exprs,
    free_port,
    require_binary,
    run_prometheus,
    start_prometheus,
)

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RUN = "fleet"
NODE = "node-a"
RANKS = {"0", "1"}
STEPS = 30
TRAINER = f"""
import time, probe
probe.init()
for step in range({STEPS}):
    time.sleep(0.01)
    probe.log({{"loss": 2.0 / (step + 1), "lr": 1e-3, "grad_norm": 1.5,
               "step_time_seconds": 0.01, "tokens_per_second": 4096.0,
               "samples_per_second": 32.0}}, step=step)
probe.finish()
"""
# Panels that are empty when nothing is wrong (no drops, no alerts); GPU panels need a GPU.
QUIET_WHEN_HEALTHY = {"Probe drops and losses", "Active alerts"}


@dataclass
class NodeAgent:
    port: int
    target: str


@pytest.fixture(scope="module")
def node_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeAgent]:
    """One node: an agent serving /metrics, and two ranks of a run that logged and finished
    (their series stay exported for retire_after_seconds, 300 s)."""
    require_binary("/usr/bin/prometheus")
    tmp = tmp_path_factory.mktemp("node")
    port = free_port()
    config = tmp / "agent.yaml"
    config.write_text(f"system: {{interval: 0.5}}\nsinks:\n  prometheus: {{port: {port}}}\n")
    endpoint = short_ipc_endpoint()
    runs = tmp / "runs"
    agent = start_agent(
        endpoint, runs, "--config", str(config), sinks="prometheus", env={"OUTRIDER_HOST": NODE}
    )
    try:
        env = dict(
            os.environ,
            OUTRIDER_ENDPOINT=endpoint,
            OUTRIDER_RUN_ID=RUN,
            OUTRIDER_HOST=NODE,
            OUTRIDER_PROBE_RAISE="1",
            WORLD_SIZE="2",
        )
        trainers = [
            subprocess.Popen(
                [PYTHON, "-c", TRAINER],
                env=dict(env, RANK=rank, LOCAL_RANK=rank),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for rank in sorted(RANKS)
        ]
        for trainer in trainers:
            _, err = trainer.communicate(timeout=120)
            assert trainer.returncode == 0, err
        wait_for(lambda: sum(e["kind"] == "bye" for e in lines(runs / RUN)) == 2, 20, "both byes")
        yield NodeAgent(port, f"127.0.0.1:{port}")
    finally:
        assert stop_agent(agent, timeout=60) == 0


def generated(source: Path, path: Path, edit: Any) -> Path:
    """A copy of a deploy/ config with ``edit`` applied to it (ports, intervals, paths)."""
    config = yaml.safe_load(source.read_text())
    edit(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def central(tmp_path: Path) -> PrometheusServer:
    """central.yml with the remote-write receiver on, its rules found from the test's copy."""

    def edit(config: dict[str, Any]) -> None:
        config["global"]["evaluation_interval"] = "1s"
        config["rule_files"] = [str(ALERT_RULES)]

    path = generated(PROMETHEUS_DIR / "central.yml", tmp_path / "central.yml", edit)
    return run_prometheus(tmp_path / "central", path, "--web.enable-remote-write-receiver")


def ranks_of(result: list[dict[str, Any]]) -> set[str]:
    return {series["metric"].get("rank", "") for series in result}


def test_agent_mode_remote_writes_every_rank_to_the_central_store(
    node_agent: NodeAgent, tmp_path: Path
) -> None:
    """agent-mode.yml (1 s scrapes) -> central.yml: the dashboard's queries see both ranks,
    with host and the cluster external label, and the concrete variables pick one rank."""
    store = central(tmp_path)
    agent_mode: PrometheusServer | None = None
    try:

        def edit(config: dict[str, Any]) -> None:
            config["global"].update(scrape_interval="1s", scrape_timeout="1s")
            [job] = config["scrape_configs"]
            job["static_configs"] = [{"targets": [node_agent.target]}]
            [remote] = config["remote_write"]
            remote["url"] = f"{store.url}/api/v1/write"
            remote["queue_config"].update(batch_send_deadline="1s", max_backoff="1s")

        path = generated(PROMETHEUS_DIR / "agent-mode.yml", tmp_path / "agent-mode.yml", edit)
        cluster = yaml.safe_load(path.read_text())["global"]["external_labels"]["cluster"]
        agent_mode = run_prometheus(tmp_path / "agent-mode", path, agent=True)

        steps = store.wait_for(f'outrider_step{{run="{RUN}"}}', 60, "remote-written steps")
        poll_ranks = lambda: ranks_of(store.query(f'outrider_step{{run="{RUN}"}}')) == RANKS  # noqa: E731
        wait_for(poll_ranks, 30, "both ranks in the central store")
        steps = store.query(f'outrider_step{{run="{RUN}"}}')
        for series in steps:
            labels = series["metric"]
            assert labels["host"] == NODE and labels["cluster"] == cluster, labels
            assert labels["job"] == "outrider" and labels["instance"] == node_agent.target
            assert float(series["value"][1]) == STEPS - 1
        # `up` passes the write relabelling (OutriderAgentDown needs it); nothing else does
        store.wait_for(f'up{{job="outrider", cluster="{cluster}"}} == 1', 30, "up")
        assert store.query('scrape_duration_seconds{job="outrider"}') == []
        # rate() over the agent's counters needs two samples of them (the trainers are done:
        # the rate itself is 0)
        store.wait_for(
            "count_over_time(outrider_agent_records_received_total[1m]) >= 2", 30, "two samples"
        )

        # Every panel's PromQL, variables as Grafana's "All" (.*), then concrete values.
        has_data: dict[str, bool] = {}
        for title, expr, requires_gpu in dashboard_exprs(variables={"run": RUN}):
            result = store.query(expr)  # raises unless Prometheus accepts the expression
            if not requires_gpu and title not in QUIET_WHEN_HEALTHY:
                has_data[title] = has_data.get(title, False) or bool(result)
        assert not [title for title, data in has_data.items() if not data], has_data
        per_rank = {
            title: expr
            for title, expr, _ in dashboard_exprs(variables={"run": RUN})
            if title in {"Loss", "Step time per rank", "Throughput per rank"}
        }
        for title, expr in per_rank.items():
            result = store.query(expr)
            assert ranks_of(result) == RANKS, (title, expr, result)
            assert {series["metric"]["host"] for series in result} == {NODE}, title
        one = {"run": RUN, "host": NODE, "rank": "1"}
        [step_time] = [
            e for t, e, _ in dashboard_exprs(variables=one) if t == "Step time per rank"
        ][:1]
        assert ranks_of(store.query(step_time)) == {"1"}
        elsewhere = dict(one, host="node-b")
        [nothing] = [
            e for t, e, _ in dashboard_exprs(variables=elsewhere) if t == "Step time per rank"
        ][:1]
        assert store.query(nothing) == []
    finally:
        if agent_mode is not None:
            agent_mode.stop()
        store.stop()


def test_federation_pulls_only_outrider_series(node_agent: NodeAgent, tmp_path: Path) -> None:
    """federation.yml: a central Prometheus federating from a scraping one gets every rank's
    outrider series with the original job/instance (honor_labels), and not the rest."""
    rack = start_prometheus(tmp_path / "rack", [node_agent.target])
    top: PrometheusServer | None = None
    try:
        rack.wait_for(f'outrider_step{{run="{RUN}"}}', 30, "the rack's scrape")

        def edit(config: dict[str, Any]) -> None:
            config["global"].update(
                scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s"
            )
            config["rule_files"] = [str(ALERT_RULES)]
            [job] = config["scrape_configs"]
            job["static_configs"] = [{"targets": [rack.url.removeprefix("http://")]}]

        path = generated(PROMETHEUS_DIR / "federation.yml", tmp_path / "federation.yml", edit)
        top = run_prometheus(tmp_path / "top", path)
        top.wait_for(f'outrider_step{{run="{RUN}"}}', 30, "federated steps")
        wait_for(lambda: ranks_of(top.query(f'outrider_step{{run="{RUN}"}}')) == RANKS, 30, "ranks")
        for series in top.query(f'outrider_step{{run="{RUN}"}}'):
            labels = series["metric"]
            assert labels["host"] == NODE and labels["job"] == "outrider", labels
            assert labels["instance"] == node_agent.target, labels
        assert top.query(f'outrider_host_cpus{{host="{NODE}"}}')
        top.wait_for('up{job="outrider"} == 1', 30, "the rack's up series")
        # match[] keeps the rack's other series out
        assert rack.query('scrape_duration_seconds{job="outrider"}')
        assert top.query('scrape_duration_seconds{job="outrider"}') == []
    finally:
        if top is not None:
            top.stop()
        rack.stop()
