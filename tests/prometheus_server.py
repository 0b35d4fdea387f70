"""A real Prometheus server for tests, and the PromQL of the shipped Grafana dashboard.

``start_prometheus(tmp_path, targets)`` runs Debian's ``/usr/bin/prometheus``
scraping ``targets`` every second and returns once it is ready; ``.query()``
asks its HTTP API, ``.stop()`` ends it (use it in a fixture finalizer).
``run_prometheus(tmp_path, config, *flags, agent=...)`` runs one with a config
of the test's own (a generated copy of a deploy/ file), in agent mode if asked.
``dashboard_exprs(path)`` lists every PromQL expression of a dashboard, with
Grafana's variables filled in, so an end-to-end test can run each one.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"
REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "outrider-training.json"
ALERT_RULES = REPO / "deploy" / "prometheus" / "alerts.yml"

#: What Grafana's variables become when a dashboard's expressions run outside Grafana.
DEFAULT_VARIABLES = {
    "run": ".*",
    "rank": ".*",
    "host": ".*",
    "__rate_interval": "1m",
    "__interval": "5s",
    "__range": "5m",
}


def require_binary(path: str) -> str:
    """``path`` if it exists; else skip the test, or fail it under CI (where it must exist)."""
    if os.access(path, os.X_OK):
        return path
    message = f"{path} is not installed (Debian package `prometheus`)"
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must install it")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def poll(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Call ``condition`` until it is truthy; at the deadline, fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
        except (OSError, AssertionError, ValueError, LookupError) as exc:
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{detail}")
        time.sleep(interval)


class PrometheusError(AssertionError):
    """The API answered with an error (bad PromQL, for instance); the message is Prometheus's."""


@dataclass
class PrometheusServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    config_path: Path

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>``: its ``data``, or PrometheusError with Prometheus's reason."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
                body = json.load(reply)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            if not isinstance(body, dict) or "status" not in body:
                raise
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; the result vector (or [] for scalars and empty results)."""
        data = self.api("query", query=expr)
        result = data["result"]
        if data["resultType"] in ("vector", "matrix"):
            return list(result)
        return [{"metric": {}, "value": result}]

    def wait_for(
        self, expr: str, timeout: float = 30.0, what: str | None = None
    ) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns samples."""
        return list(poll(lambda: self.query(expr), timeout, what or f"data for {expr!r}"))

    def targets(self) -> list[dict[str, Any]]:
        return list(self.api("targets")["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self.api("rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        return list(self.api("alerts")["alerts"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout)


def write_config(
    path: Path,
    targets: Sequence[str],
    rule_files: Sequence[str | Path] = (),
    interval: str = "1s",
) -> Path:
    """A Prometheus config scraping ``targets`` (``host:port``) as job ``outrider``."""
    config = {
        "global": {
            "scrape_interval": interval,
            "scrape_timeout": interval,
            "evaluation_interval": interval,
        },
        "rule_files": [str(Path(f).resolve()) for f in rule_files],
        "scrape_configs": [
            {"job_name": "outrider", "static_configs": [{"targets": list(targets)}]}
        ],
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def start_prometheus(
    tmp_path: Path,
    targets: Sequence[str],
    rule_files: Sequence[str | Path] = (),
    interval: str = "1s",
    timeout: float = 30.0,
) -> PrometheusServer:
    """A Prometheus server scraping ``targets`` every ``interval``, ready to query.

    Skips the test when Prometheus is not installed, except under CI (then it fails).
    """
    tmp_path.mkdir(parents=True, exist_ok=True)
    config = write_config(tmp_path / "prometheus.yml", targets, rule_files, interval)
    return run_prometheus(tmp_path, config, timeout=timeout)


def agent_mode_flag() -> str:
    """How this Prometheus is told to run in agent mode: ``--agent`` (3.x) or the 2.x
    feature flag (2.32 and later); skips when it has neither."""
    binary = require_binary(PROMETHEUS)
    help_text = subprocess.run(
        [binary, "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    text = help_text.stdout + help_text.stderr
    if "--agent" in text.replace("--storage.agent", ""):
        return "--agent"
    if "agent," in text or "agent " in text:
        return "--enable-feature=agent"
    pytest.skip(f"{PROMETHEUS} has no agent mode (Prometheus >= 2.32 needed)")


def run_prometheus(
    tmp_path: Path, config: Path, *flags: str, agent: bool = False, timeout: float = 30.0
) -> PrometheusServer:
    """Prometheus with ``config`` and ``flags`` on a free loopback port, once it is ready.

    ``agent``: in agent mode (scrape and remote-write only; no query API).
    """
    binary = require_binary(PROMETHEUS)
    tmp_path.mkdir(parents=True, exist_ok=True)
    mode = [agent_mode_flag()] if agent else []
    for attempt in range(3):  # the free port may be taken between probing and binding
        port = free_port()
        data = tmp_path / f"{'wal' if agent else 'tsdb'}-{attempt}"
        storage = f"--storage.{'agent' if agent else 'tsdb'}.path={data}"
        log_path = tmp_path / f"prometheus-{attempt}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    binary,
                    *mode,
                    f"--config.file={config}",
                    storage,
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                    *flags,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        server = PrometheusServer(f"http://127.0.0.1:{port}", process, log_path, config)

        def ready(server: PrometheusServer = server) -> bool:
            if server.process.poll() is not None:
                return True
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as reply:
                return bool(reply.status == 200)

        try:
            poll(ready, timeout, f"prometheus on {server.url} to be ready")
        except AssertionError:
            server.stop()
            raise AssertionError(f"prometheus did not start:\n{server.log()}") from None
        if process.poll() is None:
            return server
        if "address already in use" not in server.log():
            raise AssertionError(f"prometheus exited ({process.returncode}):\n{server.log()}")
    raise AssertionError("prometheus: no free port after 3 tries")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool`` (skipping, or failing under CI, where it is missing)."""
    binary = require_binary(PROMTOOL)
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


# -- the Grafana dashboard ---------------------------------------------------------------
def _panels(panels: Sequence[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", ()))


def fill_variables(expr: str, variables: Mapping[str, str] | None = None) -> str:
    """``expr`` with Grafana's ``$name`` / ``${name}`` / ``[[name]]`` variables replaced."""
    values = {**DEFAULT_VARIABLES, **(variables or {})}

    def replace(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group is not None)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no test value; pass variables=")
        return values[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", replace, expr)


def dashboard_exprs(
    path: str | Path = DASHBOARD, variables: Mapping[str, str] | None = None
) -> list[tuple[str, str, bool]]:
    """Every panel query of a Grafana dashboard: (panel title, PromQL, requires_gpu).

    Variables are filled from ``DEFAULT_VARIABLES`` (match everything) updated with
    ``variables``; ``requires_gpu`` is true for queries of DCGM (GPU) metrics.
    """
    dashboard = json.loads(Path(path).read_text())
    found = []
    for panel in _panels(dashboard.get("panels", ())):
        for target in panel.get("targets", ()):
            expr = target.get("expr")
            if not expr:
                continue
            found.append((panel.get("title", ""), fill_variables(expr, variables), "DCGM_" in expr))
    return found
