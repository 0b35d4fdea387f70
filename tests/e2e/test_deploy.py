"""deploy/: Prometheus config and rules (promtool), Grafana, systemd, Kubernetes, torchrun."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from sinks.prometheus_families import GPU_METRICS, own_metric_names
from tests.prometheus_server import ALERT_RULES, DASHBOARD, REPO, dashboard_exprs, promtool

DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
SERVICE = DEPLOY / "systemd" / "outrider-agent.service"
POD = DEPLOY / "kubernetes" / "trainer-with-agent.yaml"
LAUNCH = DEPLOY / "torchrun" / "launch.sh"
DOCS = REPO / "docs" / "prometheus.md"
BIN = Path(sys.executable).parent

#: Scalar names the dashboard and the rules expect a trainer (or the agent) to log.
CONVENTIONAL_SCALARS = {
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_second",
    "samples_per_second",
    "step_time_seconds",
}
PROMQL_KEYWORDS = {
    "sum", "by", "rate", "increase", "abs", "avg_over_time", "quantile_over_time", "and",
    "or", "time", "max", "min", "count", "ALERTS", "up", "deriv", "Inf", "bool", "without",
}  # fmt: skip


def exported_names() -> set[str]:
    """Every metric name the sink can export under the default prefix, conventional scalars too."""
    names = set(own_metric_names("outrider"))
    names |= {dcgm for _, dcgm, _, _ in GPU_METRICS}
    names |= {f"outrider_{name}" for name in CONVENTIONAL_SCALARS}
    return names


def metric_names_in(expr: str) -> set[str]:
    """Identifiers in a PromQL expression that are metric names (not labels, functions, strings)."""
    expr = re.sub(r'"[^"]*"', "", expr)  # strings: label values, regexes
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range durations
    found = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {name for name in found if name not in PROMQL_KEYWORDS}


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERT_RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


# -- Prometheus ---------------------------------------------------------------------------------
def test_prometheus_config_passes_promtool_and_scrapes_the_agent() -> None:
    """prometheus.yml is valid for promtool and scrapes 127.0.0.1:9400 every 5 s as job outrider."""
    checked = promtool("check", "config", str(PROMETHEUS_YML))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout and "1 rule files found" in checked.stdout
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "outrider"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    assert config["global"]["scrape_interval"] == "5s"
    assert config["rule_files"] == ["alerts.yml"]


def test_alert_rules_pass_promtool_check_rules() -> None:
    """alerts.yml is valid, and every rule has a severity, a summary and a description."""
    checked = promtool("check", "rules", str(ALERT_RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    rules = alert_rules()
    assert f"SUCCESS: {len(rules)} rules found" in checked.stdout
    for rule in rules:
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def test_alert_rules_cover_training_health() -> None:
    """The rules cover NaN loss, spikes, grad norm, stalls, drops, sinks, series cap, GPU heat."""
    by_name = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    expected = {
        "OutriderNonFiniteLoss": "outrider_loss",
        "OutriderLossSpike": "avg_over_time(outrider_loss",
        "OutriderGradNormExplosion": "outrider_grad_norm",
        "OutriderRunStalled": "time() - outrider_last_record_timestamp_seconds > 300",
        "OutriderProbeDroppingRecords": "rate(outrider_probe_records_dropped_total",
        "OutriderSinkDown": "outrider_sink_up == 0",
        "OutriderSeriesCapReached": "outrider_series_refused_total",
        "OutriderGpuTemperatureHigh": "DCGM_FI_DEV_GPU_TEMP",
    }
    for alert, fragment in expected.items():
        assert fragment in by_name[alert], alert


def test_alert_rules_unit_tests_pass() -> None:
    """`promtool test rules alerts_test.yml` passes, and it tests at least five different rules."""
    checked = promtool("test", "rules", str(ALERTS_TEST))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"]}
    assert len(tested) >= 5
    assert tested <= {rule["alert"] for rule in alert_rules()}


def test_rules_and_dashboard_only_query_metrics_outrider_exports() -> None:
    """Every metric name in alerts.yml and the dashboard is one the sink exports (no typos)."""
    known = exported_names()
    exprs = [rule["expr"] for rule in alert_rules()] + [expr for _, expr, _ in dashboard_exprs()]
    for expr in exprs:
        unknown = metric_names_in(expr) - known
        assert not unknown, f"{expr}: {unknown}"


# -- Grafana ------------------------------------------------------------------------------------
def test_dashboard_structure() -> None:
    """The dashboard has schemaVersion 39, run/rank variables from label_values, unique panels."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] == 39
    assert dashboard["uid"] == "outrider-training"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["run"]["query"]["query"] == "label_values(outrider_step, run)"
    assert variables["rank"]["query"]["query"].startswith("label_values(outrider_step")
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_has_the_training_panels() -> None:
    """Loss, lr, grad norm, throughput, step-time percentiles, GPUs, drops, sinks and alerts."""
    queries = " ".join(expr for _, expr, _ in dashboard_exprs())
    for metric in [
        "outrider_loss",
        "outrider_lr",
        "outrider_grad_norm",
        "outrider_tokens_per_second",
        "outrider_samples_per_second",
        "outrider_step_time_seconds",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "outrider_probe_records_dropped_total",
        "outrider_sink_up",
        "outrider_alerts_active",
    ]:
        assert metric in queries, metric


def test_dashboard_exprs_fill_variables_and_flag_gpu_queries() -> None:
    """dashboard_exprs() leaves no $variable behind and marks exactly the DCGM queries as GPU."""
    exprs = dashboard_exprs()
    for title, expr, requires_gpu in exprs:
        assert "$" not in expr, (title, expr)
        assert requires_gpu == ("DCGM_" in expr)
    [chosen] = {expr for _, expr, _ in dashboard_exprs(variables={"run": "r1"}) if "loss" in expr}
    assert 'run=~"r1"' in chosen


# -- systemd ------------------------------------------------------------------------------------
def service_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    text = SERVICE.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(" ".join(value.split()))
    return settings


def test_systemd_unit_runs_the_agent_hardened() -> None:
    """The unit runs `outrider agent` with the runs dir and config, restarts, and is hardened."""
    settings = service_settings()
    [exec_start] = settings["ExecStart"]
    assert exec_start.split()[1:2] == ["agent"]
    assert "--runs-dir /var/lib/outrider/runs" in exec_start
    assert "--config /etc/outrider/agent.yaml" in exec_start
    expected = {
        "Restart": "on-failure",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "RuntimeDirectory": "outrider",
        "RuntimeDirectoryMode": "0700",
        "PrivateTmp": "yes",
    }
    for key, wanted in expected.items():
        assert settings[key] == [wanted], key
    assert "/var/lib/outrider" in settings["ReadWritePaths"][0].split()
    assert "ipc:///run/outrider/agent.sock" in exec_start  # the socket lives in the 0700 dir


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` reports nothing (ExecStart pointed at the installed script)."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package `systemd`)")
    unit = tmp_path / SERVICE.name
    unit.write_text(SERVICE.read_text().replace("/usr/local/bin/outrider", str(BIN / "outrider")))
    checked = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == "" and checked.stderr.strip() == ""


# -- Kubernetes -----------------------------------------------------------------------------------
def pod_documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(POD.read_text())}


def test_kubernetes_pod_runs_the_agent_as_a_native_sidecar() -> None:
    """A Pod: the agent is an init container with restartPolicy Always sharing /run/outrider."""
    pod = pod_documents()["Pod"]
    assert pod["apiVersion"] == "v1"
    spec = pod["spec"]
    [agent] = spec["initContainers"]
    [trainer] = spec["containers"]
    assert agent["restartPolicy"] == "Always"
    assert agent["command"][:2] == ["outrider", "agent"]
    assert "ipc:///run/outrider/agent.sock" in agent["command"]
    assert agent["resources"]["limits"]["memory"] and agent["resources"]["limits"]["cpu"]
    assert agent["startupProbe"]["httpGet"]["path"] == "/metrics"

    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    socket_volumes = [
        {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/run/outrider"}
        for container in (agent, trainer)
    ]
    assert socket_volumes[0] == socket_volumes[1] and len(socket_volumes[0]) == 1
    assert "emptyDir" in volumes[socket_volumes[0].pop()]

    env = {item["name"]: item for item in trainer["env"]}
    assert env["OUTRIDER_ENDPOINT"]["value"] == "ipc:///run/outrider/agent.sock"
    port = {p["containerPort"] for p in agent["ports"]}
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) in port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_kubernetes_manifests_match_the_kubernetes_schema() -> None:
    """Every document validates (strictly, no unknown fields) against Kubernetes 1.29's schema."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed"
    )
    for kind, document in pod_documents().items():
        version = kubernetes_validate.validate(document, "1.29.0", strict=True)
        assert version == "1.29", kind


def test_kubernetes_agent_config_is_a_valid_agent_config() -> None:
    """The agent.yaml in the ConfigMap passes the agent's own config validation."""
    from agent import config as agent_config

    text = pod_documents()["ConfigMap"]["data"]["agent.yaml"]
    config = agent_config.parse(text, "configmap agent.yaml")
    prometheus = config.enabled_sinks()["prometheus"].options()
    assert prometheus["host"] == "0.0.0.0" and prometheus["port"] == 9400


# -- torchrun -------------------------------------------------------------------------------------
def test_launch_script_without_arguments_prints_usage(tmp_path: Path) -> None:
    """launch.sh with no training script exits 2 with a usage line."""
    done = subprocess.run(
        ["bash", str(LAUNCH)], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2 and "usage:" in done.stderr


@pytest.mark.slow
def test_launch_script_runs_torchrun_under_outrider(tmp_path: Path) -> None:
    """launch.sh runs 2-process torchrun under `outrider run`; both ranks' scalars are stored."""
    (tmp_path / "train.py").write_text(
        "import os, probe\n"
        "probe.init()\n"
        "for step in range(5):\n"
        "    probe.log({'loss': 1.0 / (step + 1)}, step=step)\n"
        "probe.finish()\n"
    )
    runs = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTRIDER_")}
    env.update(
        OUTRIDER=str(BIN / "outrider"),
        TORCHRUN=str(BIN / "torchrun"),
        NPROC_PER_NODE="2",
        RUN_ID="launch-test",
        OUTRIDER_SINKS="none",
        OUTRIDER_RUNS_DIR=str(runs),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(
        ["bash", str(LAUNCH), "train.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = [orjson.loads(line) for line in (runs / "launch-test" / "metrics.jsonl").open("rb")]
    steps = {(e["rank"], e["step"]) for e in lines if e["kind"] == "scalars"}
    assert steps == {(rank, step) for rank in (0, 1) for step in range(5)}


# -- docs -----------------------------------------------------------------------------------------
def test_docs_list_every_metric_the_sink_exports() -> None:
    """docs/prometheus.md names every metric family the sink can export, and the deploy files."""
    text = DOCS.read_text()
    families = {
        name.removesuffix("_total")
        for name in own_metric_names("outrider")
        if not name.endswith(("_created", "_count", "_sum", "_bucket", "_info"))
    }
    for family in sorted(families):
        assert f"`{family}" in text, family
    for _, dcgm, _, _ in GPU_METRICS:
        assert f"`{dcgm}`" in text, dcgm
    for path in (PROMETHEUS_YML, ALERT_RULES, DASHBOARD, SERVICE, POD, LAUNCH):
        assert str(path.relative_to(REPO)) in text, path
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in text, rule["alert"]
