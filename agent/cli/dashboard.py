"""The live dashboard on the command line: ``--dashboard`` of ``run``, ``agent`` and
``aggregator``, and ``outrider dashboard`` over any runs directory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from agent.aggregation.endpoint import is_loopback
from agent.config import AgentConfig, DashboardSettings
from agent.dashboard import process

DASHBOARD_HELP = (
    "Where the live dashboard listens, or `off` [default: the config's, 127.0.0.1:8080]. "
    "Off loopback it needs a token (config dashboard.token or env OUTRIDER_DASHBOARD_TOKEN)."
)


def dashboard_option(function: Any) -> Any:
    return click.option(
        "--dashboard",
        "dashboard",
        envvar="OUTRIDER_DASHBOARD",
        show_envvar=True,
        metavar="HOST:PORT|off",
        help=DASHBOARD_HELP,
    )(function)


def dashboard_settings(config: AgentConfig, value: str | None) -> DashboardSettings:
    """The config's dashboard with ``--dashboard`` and the token variable applied; a
    non-loopback address without a token is a usage error."""
    settings = config.dashboard.model_copy()
    token = os.environ.get(process.TOKEN_ENV) or settings.token
    settings.token = token or None
    if value is not None:
        if value.lower() in ("off", "none", "false", "0"):
            settings.enabled = False
            return settings
        host, _, port = value.rpartition(":")
        if not port.isdigit() or int(port) > 65535:
            raise click.BadParameter(
                f"{value!r} is not HOST:PORT, PORT or off", param_hint="--dashboard"
            )
        settings.enabled = True
        settings.host = host.strip("[]") or "127.0.0.1"
        settings.port = int(port)
    if settings.token is not None and len(settings.token) < 8:
        raise click.UsageError(f"{process.TOKEN_ENV} is too short: give 8 characters or more")
    if settings.enabled and not settings.token and not is_loopback(settings.host):
        raise click.UsageError(
            f"the dashboard on {settings.host} is reachable from other machines: set a token "
            f"(env {process.TOKEN_ENV} or config dashboard.token, 8+ characters) or keep it on "
            "127.0.0.1"
        )
    return settings


def serve_beside(settings: DashboardSettings, runs_dir: Path, serve: Callable[[], int]) -> int:
    """``serve()`` (an agent's or aggregator's loop) with its dashboard beside it, stopped
    with it."""
    web = start_dashboard(settings, runs_dir)
    try:
        return serve()
    finally:
        if web is not None:
            web.stop()


def start_dashboard(settings: DashboardSettings, runs_dir: Path) -> process.Dashboard | None:
    """The dashboard beside an agent, if it is enabled; warnings go to stderr."""
    if not settings.enabled:
        return None
    return process.start(
        runs_dir,
        settings.host,
        settings.port,
        settings.token,
        lambda message: click.echo(f"outrider: {message}", err=True),
    )


@click.command("dashboard")
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OUTRIDER_RUNS_DIR",
    show_envvar=True,
    default=Path("outrider-runs"),
    show_default=True,
    help="The runs (and job views in jobs/) to show.",
)
@click.option(
    "--bind",
    default=None,
    metavar="HOST:PORT",
    help="Where to listen [default: the config's, 127.0.0.1:8080]; off loopback it needs "
    f"a token (env {process.TOKEN_ENV} or the config's dashboard.token).",
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path))
def dashboard_command(runs_dir: Path, bind: str | None, config_path: Path | None) -> None:
    """Serve the live dashboard over a runs directory until Ctrl-C.

    `outrider run` and `outrider agent` start one by themselves; this serves
    runs that were recorded elsewhere, or after the agent has gone. Pages:
    runs, a run's charts (live), compare, alerts, export downloads.
    """
    from agent.cli.commands import load_config

    settings = dashboard_settings(load_config(config_path, None), bind or None)
    if bind is None and not settings.enabled:
        settings.enabled = True
    try:
        sock = process.bind(settings.host, settings.port)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from None
    where = process.url(settings.host, sock.getsockname()[1])
    click.echo(f"outrider dashboard at {where} over {runs_dir.resolve()} (Ctrl-C stops it)")
    process.serve(sock, runs_dir, settings.token, None)
