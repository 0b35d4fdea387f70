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

from sinks.prometheus_families import GPU_METRICS, HOST_LABELS, OWN_METRICS, own_metric_names
from tests.prometheus_server import ALERT_RULES, DASHBOARD, REPO, dashboard_exprs, promtool

DEPLOY = REPO / "deploy"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yml"
SERVICE = DEPLOY / "systemd" / "outrider-agent.service"
POD = DEPLOY / "kubernetes" / "trainer-with-agent.yaml"
DAEMONSET = DEPLOY / "kubernetes" / "node-agent-daemonset.yaml"
AGENT_MODE = DEPLOY / "prometheus" / "agent-mode.yml"
CENTRAL = DEPLOY / "prometheus" / "central.yml"
FEDERATION = DEPLOY / "prometheus" / "federation.yml"
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
    "group_left", "group_right",
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


def test_agent_mode_config_passes_promtool_and_remote_writes() -> None:
    """agent-mode.yml is a valid agent-mode config: scrapes the agent, a cluster external
    label, remote_write with a bounded queue keeping outrider's series and `up`."""
    checked = promtool("check", "config", "--agent", str(AGENT_MODE))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(AGENT_MODE.read_text())
    assert "rule_files" not in config and "alerting" not in config  # agents evaluate nothing
    assert set(config["global"]["external_labels"]) == {"cluster"}
    [job] = config["scrape_configs"]
    assert job["job_name"] == "outrider"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:9400"]
    [remote] = config["remote_write"]
    assert remote["url"].endswith("/api/v1/write")
    queue = remote["queue_config"]
    assert {"capacity", "max_shards", "max_samples_per_send", "batch_send_deadline"} <= set(queue)
    [keep] = remote["write_relabel_configs"]
    assert keep["action"] == "keep" and keep["source_labels"] == ["__name__"]
    kept = re.compile(f"^(?:{keep['regex']})$")
    for name in ("outrider_loss", "DCGM_FI_DEV_GPU_UTIL", "up"):
        assert kept.match(name), name
    assert not kept.match("scrape_duration_seconds")


def test_central_and_federation_configs_pass_promtool_with_the_rules() -> None:
    """central.yml (remote-write receiver) and federation.yml load alerts.yml; federation
    pulls outrider_* and DCGM_* (and `up`) from /federate with honor_labels."""
    for path in (CENTRAL, FEDERATION):
        checked = promtool("check", "config", str(path))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "1 rule files found" in checked.stdout, path
        assert yaml.safe_load(path.read_text())["rule_files"] == ["alerts.yml"]
    assert "--web.enable-remote-write-receiver" in CENTRAL.read_text()
    [job] = yaml.safe_load(FEDERATION.read_text())["scrape_configs"]
    assert job["metrics_path"] == "/federate" and job["honor_labels"] is True
    matchers = job["params"]["match[]"]
    assert '{__name__=~"outrider_.*|DCGM_.*"}' in matchers
    assert 'up{job="outrider"}' in matchers


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


#: metric families labelled run/rank/host: the trainer's scalars and the sink's per-rank ones
RANK_FAMILIES = {f"outrider_{name}" for name in CONVENTIONAL_SCALARS} | {
    f"outrider_{metric.name}{suffix}"
    for metric in OWN_METRICS
    if "rank" in metric.labels
    for suffix in ("", "_total")
}
HOST_FAMILIES = {f"outrider_{m.name}" for m in OWN_METRICS if tuple(m.labels) == HOST_LABELS}
SELECTOR = re.compile(r'(?<![\w"$])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?')


def matchers(selector: str | None) -> dict[str, str]:
    return dict(re.findall(r'(\w+)\s*=~\s*"([^"]*)"', selector or ""))


def test_dashboard_variables_suit_a_central_store() -> None:
    """run, host and rank: multi-select with All (.*), each from label_values narrowed by
    the ones before it (run -> host -> rank)."""
    dashboard = json.loads(DASHBOARD.read_text())
    variables = [v for v in dashboard["templating"]["list"] if v["type"] == "query"]
    assert [v["name"] for v in variables] == ["run", "host", "rank"]
    for variable in variables:
        assert variable["multi"] and variable["includeAll"], variable["name"]
        assert variable["allValue"] == ".*", variable["name"]
        assert variable["query"]["query"].startswith("label_values("), variable["name"]
        assert variable["query"]["query"].endswith(f", {variable['name']})"), variable["name"]
    by_name = {v["name"]: v["query"]["query"] for v in variables}
    assert 'run=~"$run"' in by_name["host"]
    assert 'run=~"$run"' in by_name["rank"] and 'host=~"$host"' in by_name["rank"]


def test_every_dashboard_query_follows_the_variables() -> None:
    """Per-rank series are selected by run, host and rank; GPU series by Hostname; host
    series by host; and every query, the agent's own panels too, follows $host."""
    dashboard = json.loads(DASHBOARD.read_text())
    checked = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", ()):
            expr = target["expr"]
            assert "$host" in expr, (panel["title"], expr)
            plain = re.sub(r'__name__\s*=~\s*"[^"]*"', "", expr)  # names as a regex: no selector
            for name, selector in SELECTOR.findall(plain):
                found = matchers(selector)
                if name in RANK_FAMILIES:
                    wanted = {"run": "$run", "host": "$host", "rank": "$rank"}
                    assert {k: found.get(k) for k in wanted} == wanted, (panel["title"], expr)
                elif name.startswith("DCGM_"):
                    assert found.get("Hostname") == "$host", (panel["title"], expr)
                elif name in HOST_FAMILIES:
                    assert found.get("host") == "$host", (panel["title"], expr)
                else:
                    continue
                checked.add(name)
    assert {"outrider_loss", "outrider_step", "DCGM_FI_DEV_GPU_UTIL"} <= checked


def test_dashboard_has_per_rank_step_time_and_throughput() -> None:
    """A row of per-rank panels: step time (and its ratio to the run's fastest rank) and
    tokens/samples per second, one series per rank (no aggregation)."""
    by_title = {}
    for title, expr, _ in dashboard_exprs():
        by_title.setdefault(title, []).append(expr)
    step = by_title["Step time per rank"]
    assert step[0].startswith("outrider_step_time_seconds{")
    assert "min by (run)" in step[1]
    throughput = by_title["Throughput per rank"]
    assert [e.split("{")[0] for e in throughput] == [
        "outrider_tokens_per_second",
        "outrider_samples_per_second",
    ]


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


def daemonset_documents() -> dict[str, dict[str, Any]]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(DAEMONSET.read_text())}


def test_kubernetes_daemonset_runs_a_node_agent_for_scraping() -> None:
    """A DaemonSet running `outrider agent` on the node's socket directory, /metrics on a
    hostPort with a readiness probe, the node's name as OUTRIDER_HOST, bounded, unprivileged."""
    daemonset = daemonset_documents()["DaemonSet"]
    spec = daemonset["spec"]["template"]["spec"]
    [agent] = spec["containers"]
    assert agent["command"][:2] == ["outrider", "agent"]
    assert "ipc:///run/outrider/agent.sock" in agent["command"]
    env = {item["name"]: item for item in agent["env"]}
    assert env["OUTRIDER_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    [port] = agent["ports"]
    assert port["containerPort"] == 9400 and (port.get("hostPort") or spec.get("hostNetwork"))
    probe = agent["readinessProbe"]["httpGet"]
    assert probe["path"] == "/metrics" and probe["port"] in (port["name"], 9400)
    limits = agent["resources"]["limits"]
    assert limits["cpu"] and limits["memory"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False
    assert agent["securityContext"]["capabilities"]["drop"] == ["ALL"]
    volumes = {volume["name"]: volume for volume in spec["volumes"]}
    socket = next(m for m in agent["volumeMounts"] if m["mountPath"] == "/run/outrider")
    assert volumes[socket["name"]]["hostPath"]["path"] == "/run/outrider"
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


def test_kubernetes_daemonset_matches_the_schema_and_its_agent_config_is_valid() -> None:
    """Every document validates strictly against Kubernetes 1.29; agent.yaml parses and
    binds the sink on the Pod's address, on the container's port."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (PyPI) is not installed"
    )
    documents = daemonset_documents()
    for kind, document in documents.items():
        assert kubernetes_validate.validate(document, "1.29.0", strict=True) == "1.29", kind
    from agent import config as agent_config

    text = documents["ConfigMap"]["data"]["agent.yaml"]
    config = agent_config.parse(text, "configmap agent.yaml")
    prometheus = config.enabled_sinks()["prometheus"].options()
    assert prometheus["host"] == "0.0.0.0" and prometheus["port"] == 9400
    assert config.system.enabled


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
        OUTRIDER_DASHBOARD="off",
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
    deploy_files = (PROMETHEUS_YML, ALERT_RULES, DASHBOARD, SERVICE, POD, LAUNCH, DAEMONSET)
    for path in (*deploy_files, AGENT_MODE, CENTRAL, FEDERATION):
        assert str(path.relative_to(REPO)) in text, path
    for rule in alert_rules():
        assert f"`{rule['alert']}`" in text, rule["alert"]
