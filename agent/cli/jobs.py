"""The job tier on the command line: ``outrider aggregator``, and the options that make a
node agent (``outrider agent``, ``outrider run``) forward to one."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from agent.aggregation import torchrun
from agent.aggregation.config import DEFAULT_PORT
from agent.aggregation.endpoint import is_loopback, split_host_port, tcp_url
from agent.cli.dashboard import dashboard_option, dashboard_settings, serve_beside
from agent.cli.launcher import JobTier
from agent.config import AgentConfig, SinkSettings

if TYPE_CHECKING:  # the uplink's and run store's imports wait for a node that forwards
    from agent.aggregation.forwarding import Forwarder

#: sinks only the job aggregator writes when a node forwards to one: one W&B run and one
#: TensorBoard log per job, not one per node
JOB_WRITERS = ("wandb", "tensorboard")

KEYS_HELP = "CURVE keys made by `outrider keys` [env OUTRIDER_KEYS]; required off loopback."


def keys_options(function: Any) -> Any:
    """--keys and --insecure, shared by every command that speaks to the job tier."""
    function = click.option(
        "--insecure",
        is_flag=True,
        help="Plain TCP to or from a non-loopback address (a trusted network only).",
    )(function)
    return click.option(
        "--keys",
        "keys_dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="OUTRIDER_KEYS",
        show_envvar=True,
        help=KEYS_HELP,
    )(function)


def host_option(function: Any) -> Any:
    return click.option(
        "--host",
        envvar="OUTRIDER_HOST",
        show_envvar=True,
        help="This node's label in the job view and on /metrics (default: the hostname).",
    )(function)


def check_transport(where: str, keys_dir: Path | None, insecure: bool, option: str) -> None:
    """Plain TCP off loopback only when asked for: a usage error naming the fix otherwise."""
    host, _ = split_host_port(where)
    if keys_dir is None and not insecure and not is_loopback(host):
        raise click.UsageError(
            f"{option} {where} is not on loopback: give --keys DIR (made by `outrider keys DIR`) "
            "so that nodes and aggregator authenticate and encrypt, or --insecure on a trusted "
            "network"
        )


def node_config(config: AgentConfig, forward_to: str) -> AgentConfig:
    """A node agent's config when it forwards: the job's W&B run and TensorBoard log are
    the aggregator's to write, so this node keeps its run store and /metrics."""
    sinks = {name: settings.model_copy() for name, settings in config.sinks.items()}
    for name in JOB_WRITERS:
        settings = sinks.get(name)
        if settings is None:
            settings = sinks[name] = SinkSettings()
        settings.enabled = False
    aggregation = config.aggregation.model_copy(update={"forward_to": forward_to})
    return config.model_copy(update={"sinks": sinks, "aggregation": aggregation})


def node_forwarder(
    config: AgentConfig,
    forward_to: str,
    keys_dir: Path | None,
    insecure: bool,
    host: str | None,
) -> tuple[AgentConfig, Forwarder]:
    """A node agent's config and its forwarder to the job aggregator at ``forward_to``."""
    import socket

    from agent.aggregation.forwarding import Forwarder
    from agent.aggregation.uplink import Uplink

    settings = config.aggregation
    keys_dir = keys_dir or settings.keys_dir
    insecure = insecure or settings.insecure
    check_transport(forward_to, keys_dir, insecure, "--forward-to")
    try:
        url = tcp_url(*split_host_port(forward_to))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--forward-to") from None
    node = host or os.environ.get("OUTRIDER_HOST") or socket.gethostname()
    try:
        uplink = Uplink(
            url,
            node,
            keys_dir=keys_dir,
            insecure=insecure,
            backlog=settings.backlog,
            spool_dir=settings.spool_dir,
            spool_bytes=settings.spool_bytes,
            heartbeat_seconds=settings.heartbeat_seconds,
        )
    except ValueError as exc:  # keys missing or unreadable
        raise click.ClickException(str(exc)) from None
    uplink.start()
    forwarder = Forwarder(
        uplink, node, raw=settings.forward_raw, accounting_seconds=settings.accounting_seconds
    )
    return node_config(config, forward_to), forwarder


def resolve_job_tier(
    command: list[str],
    aggregator: str,
    serve: bool | None,
    keys_dir: Path | None,
    insecure: bool,
    say: Any,
) -> JobTier | None:
    """``outrider run``'s job tier: from --aggregator, else from a multi-node torchrun."""
    if aggregator == "off":
        return None
    launch = torchrun.parse(command)
    if aggregator == "auto":
        if launch is None or not launch.multi_node:
            return None
        host = launch.rank0_host
        if host is None:
            say(
                "multi-node torchrun without --master-addr or --rdzv-endpoint: no job view "
                "(give --aggregator HOST:PORT)"
            )
            return None
        where = f"{host}:{DEFAULT_PORT}"
        serve = launch.node_rank == 0 if serve is None else serve
    else:
        try:
            split_host_port(aggregator)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--aggregator") from None
        where = aggregator
        serve = bool(serve)
    check_transport(where, keys_dir, insecure, "--aggregator")
    return JobTier(where, serve, keys_dir, insecure)


def job_run_id(command: list[str], run_id: str | None) -> str | None:
    """The run id every node of a job must share: --run-id, else torchrun's --rdzv-id."""
    if run_id:
        return run_id
    launch = torchrun.parse(command)
    return launch.job_id if launch is not None else None


@click.command()
@click.option(
    "--bind",
    metavar="[HOST:]PORT",
    help=f"Where node agents reach it [default: the config's, 127.0.0.1:{DEFAULT_PORT}].",
)
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OUTRIDER_RUNS_DIR",
    show_envvar=True,
    help="Where job views are stored [default ./outrider-runs].",
)
@keys_options
@click.option("--ready-fd", type=int, help="Write 'ready' to this file descriptor once bound.")
@click.option("--parent-pid", type=int, help="Exit if this process (the launcher) goes away.")
@click.option(
    "--drain-timeout", type=float, help="Seconds to keep receiving after SIGTERM [default 5]."
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--sinks", metavar="NAME[,NAME...]", help="Only these sinks; `none` for none.")
@dashboard_option
def aggregator(
    bind: str | None,
    runs_dir: Path | None,
    keys_dir: Path | None,
    insecure: bool,
    ready_fd: int | None,
    parent_pid: int | None,
    drain_timeout: float | None,
    log_level: str,
    config_path: Path | None,
    sinks: str | None,
    dashboard: str | None,
) -> None:
    """Run a job aggregator: the one view of a job whose nodes each run an agent.

    Node agents (`outrider agent --forward-to HOST:PORT`, or `outrider run` of
    a multi-node torchrun) send it each rank's window summaries, alerts,
    events and accounting. It stores the job's view, finds stragglers and
    ranks that diverge, and is the only writer of the job's W&B run and
    TensorBoard log. `outrider run` starts one on the node of node rank 0 by
    itself; run this command instead when rank 0's node must stay quiet.
    """
    from agent.aggregation.aggregator import Aggregator
    from agent.cli.commands import load_config, resolve_runs_dir
    from agent.store.disk import check_runs_dir

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config(config_path, sinks)
    board = dashboard_settings(config, dashboard)
    settings = config.aggregation
    where = bind or settings.bind
    try:
        host, port = split_host_port(where)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bind") from None
    keys_dir = keys_dir or settings.keys_dir
    insecure = insecure or settings.insecure
    check_transport(where, keys_dir, insecure, "--bind")
    config = config.model_copy(
        update={
            "aggregation": settings.model_copy(update={"keys_dir": keys_dir, "insecure": insecure}),
            "sinks": _job_sinks(config),
        }
    )
    store_dir = resolve_runs_dir(runs_dir, config).resolve()
    unusable = check_runs_dir(store_dir)
    if unusable is not None:
        raise click.ClickException(f"cannot store job views in {store_dir}: {unusable}")
    try:
        daemon = Aggregator(
            tcp_url(host, port),
            store_dir,
            config=config,
            drain_timeout=config.drain_timeout if drain_timeout is None else drain_timeout,
            parent_pid=parent_pid,
        )
    except (ValueError, OSError) as exc:
        raise click.ClickException(f"cannot start the aggregator on {where}: {exc}") from None

    def ready() -> None:
        logging.getLogger("outrider.aggregator").info(
            "outrider aggregator listening at %s, job views in %s", daemon.endpoint, store_dir
        )
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    sys.exit(serve_beside(board, store_dir, lambda: daemon.serve(ready)))


def _job_sinks(config: AgentConfig) -> dict[str, Any]:
    """Per-rank data in one W&B run (``rank<N>/`` keys) and one TensorBoard log (``rank-N``
    directories), unless the config says otherwise."""
    sinks = {name: settings.model_copy() for name, settings in config.sinks.items()}
    defaults = {"wandb": {"ranks": "all"}, "tensorboard": {"per_rank": "always"}}
    for name, options in defaults.items():
        data = (sinks.get(name) or SinkSettings()).model_dump(by_alias=True, exclude_none=True)
        for key, value in options.items():
            data.setdefault(key, value)
        sinks[name] = SinkSettings.model_validate(data)
    return sinks


def job_lines(job: dict[str, Any]) -> list[str]:
    """`outrider show` of a job view: its nodes and both tiers' accounting, its ranks,
    the slowest ones and the stragglers."""
    nodes = job.get("nodes") or {}
    ranks = job.get("ranks") or []
    lines = [f"job       {len(ranks)} ranks on {len(nodes)} nodes"]
    for name, node in nodes.items():
        records, uplink = node.get("records") or {}, node.get("uplink") or {}
        lines.append(
            f"  node {name:<14} records sent {records.get('sent', 0):>8} received "
            f"{records.get('received', 0):>8} dropped {records.get('dropped', 0):>6} lost "
            f"{records.get('lost', 0):>5} | uplink sent {uplink.get('sent', 0):>6} received "
            f"{uplink.get('received', 0):>6} dropped {uplink.get('dropped', 0):>5} lost "
            f"{uplink.get('lost', 0):>4} {'complete' if node.get('complete') else 'open'}"
        )
    if ranks:
        lines.append("")
        lines.append("  RANK HOST            LOCAL RESTART  STEP  STEP TIME p50  RELATIVE  INDIV.")
        for rank in ranks:
            lines.append(
                f"  {rank['rank']:>4} {rank['host']!s:<15} {rank['local_rank']:>5} "
                f"{rank['restart']:>7} {_cell(rank.get('last_step')):>5} "
                f"{_cell(rank.get('step_time_p50'), 's'):>14} "
                f"{_cell(rank.get('relative_score')):>9} {_cell(rank.get('individual_score')):>7}"
                + ("  STRAGGLER" if rank.get("straggler") else "")
            )
    slowest = job.get("slowest") or []
    if slowest:
        names = ", ".join(f"rank {r['rank']} ({r['host']})" for r in slowest[:3])
        lines.append(f"\n  slowest: {names}")
    return lines


def _cell(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}{unit}"
    return f"{value}{unit}"
