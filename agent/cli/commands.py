"""The ``outrider`` command: run, agent, runs, show, report, config, keys."""

from __future__ import annotations

import datetime
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click
import orjson

from agent import config as agent_config
from agent.aggregation.config import DEFAULT_PORT
from agent.cli import compare, jobs, launcher, replay, report, simulate, top
from agent.cli.dashboard import (
    dashboard_command,
    dashboard_option,
    dashboard_settings,
    serve_beside,
)
from agent.cli.export import export_command
from agent.config import AgentConfig
from agent.store.disk import check_runs_dir, describe
from agent.store.runs import RunNotFound, list_runs, resolve, summarise

RUNS_DIR_HELP = "Where runs are stored [env OUTRIDER_RUNS_DIR; default ./outrider-runs]."


def runs_dir_option(function: Any) -> Any:
    return click.option(
        "--runs-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="OUTRIDER_RUNS_DIR",
        show_envvar=True,
        help=RUNS_DIR_HELP,
    )(function)


def config_options(function: Any) -> Any:
    """--config and --sinks, shared by `agent` and `run`."""
    function = click.option(
        "--sinks",
        envvar="OUTRIDER_SINKS",
        show_envvar=True,
        metavar="NAME[,NAME...]",
        help="Only these sinks (their options still come from --config); `none` for the run "
        "store alone. Default: the config's sinks (tensorboard, prometheus, wandb).",
    )(function)
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar="OUTRIDER_CONFIG",
        show_envvar=True,
        help="Agent configuration (YAML); `outrider config --default` prints a documented one.",
    )(function)


def load_config(config_path: Path | None, sinks: str | None) -> AgentConfig:
    """The validated config with --sinks applied; a bad file is a usage error naming the line."""
    names = None if sinks is None else [s for s in sinks.split(",") if s and s != "none"]
    try:
        config = agent_config.load(config_path, names)
    except agent_config.ConfigError as exc:
        raise click.ClickException(f"bad config:\n{exc}") from None
    if names is not None:
        try:
            config = config.only_sinks(names)
        except agent_config.ConfigError as exc:
            raise click.BadParameter(str(exc), param_hint="--sinks") from None
    return config


def resolve_runs_dir(option: Path | None, config: AgentConfig | None = None) -> Path:
    """--runs-dir / OUTRIDER_RUNS_DIR, else the config's runs_dir, else ./outrider-runs."""
    if option is not None:
        return option
    if config is not None and config.runs_dir is not None:
        return config.runs_dir
    return Path("outrider-runs")


def tcp_endpoint(value: str | None) -> str | None:
    """``PORT`` or ``HOST:PORT`` -> ``tcp://HOST:PORT``, loopback unless a host is named."""
    if value is None:
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{value!r} is not PORT or HOST:PORT")
    return f"tcp://{host or '127.0.0.1'}:{port}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="outrider")
def main() -> None:
    """outrider: training telemetry from a sidecar agent, at almost no cost to the run.

    \b
    Typical use:
      outrider run -- python train.py          # agent beside the trainer
      outrider runs                            # what has been recorded
      outrider show latest                     # summary of one run
    In the trainer: `import probe; probe.init()` and `probe.log({...}, step=step)`.
    """


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@runs_dir_option
@click.option("--run-id", help="Run id to use (default: a new timestamped id).")
@click.option(
    "--tcp", "tcp", metavar="[HOST:]PORT", help="Listen on TCP instead of a private IPC socket."
)
@click.option(
    "--drain-timeout",
    default=10.0,
    show_default=True,
    help="Seconds the agent may take to store the last records after the command exits.",
)
@click.option(
    "--require-agent",
    is_flag=True,
    help="Fail (exit 2) instead of running without telemetry when the agent cannot start.",
)
@click.option("-q", "--quiet", is_flag=True, help="No outrider lines on stderr.")
@jobs.host_option
@click.option(
    "--aggregator",
    default="auto",
    show_default=True,
    metavar="auto|off|HOST:PORT",
    help="The job aggregator this node forwards to. auto: for a multi-node torchrun, one at "
    f"its --master-addr, port {DEFAULT_PORT}, started by the node of --node-rank 0.",
)
@click.option(
    "--serve-aggregator/--no-serve-aggregator",
    default=None,
    help="Start the job aggregator beside this node's agent [default: on node rank 0].",
)
@jobs.keys_options
@dashboard_option
@config_options
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    runs_dir: Path | None,
    config_path: Path | None,
    sinks: str | None,
    run_id: str | None,
    tcp: str | None,
    drain_timeout: float,
    require_agent: bool,
    quiet: bool,
    host: str | None,
    aggregator: str,
    serve_aggregator: bool | None,
    keys_dir: Path | None,
    insecure: bool,
    dashboard: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND (e.g. `python train.py` or `torchrun ...`) with an agent beside it.

    The agent starts first; COMMAND gets OUTRIDER_ENDPOINT and OUTRIDER_RUN_ID
    in its environment, which `probe.init()` reads. Signals are forwarded to
    COMMAND; when it exits the agent stores the last records and stops, and
    outrider exits with COMMAND's exit status. Put `--` before COMMAND if it
    has options of its own.

    \b
    Several nodes: run it on every node with the same --run-id (or torchrun's
    --rdzv-id), e.g.
      outrider run --run-id job7 --keys ./keys -- torchrun --nnodes 2 \\
          --node-rank 0 --master-addr node0 --nproc-per-node 8 train.py
    Every node's agent keeps its ranks' records and /metrics and forwards
    window summaries, alerts and accounting to the job aggregator, which
    node rank 0 starts; it writes the job's one W&B run and TensorBoard log.
    """
    config = load_config(config_path, sinks)
    agent_args = ["--config", str(config_path.resolve())] if config_path else []
    if sinks is not None:
        agent_args += ["--sinks", sinks]
    board = dashboard_settings(config, dashboard)
    if dashboard is not None:
        agent_args += ["--dashboard", dashboard]

    def say(message: str) -> None:
        if not quiet:
            click.echo(f"outrider: {message}", err=True)

    argv = list(command)
    keys_dir = keys_dir or config.aggregation.keys_dir
    tier = jobs.resolve_job_tier(argv, aggregator, serve_aggregator, keys_dir, insecure, say)
    if tier is not None:
        run_id = jobs.job_run_id(argv, run_id)
        if run_id is None:
            raise click.UsageError(
                "several nodes make one job only if they share a run id: give every node the "
                "same --run-id (or torchrun's --rdzv-id)"
            )
    # The agent's dashboard lists the job views in jobs/ too: the aggregator needs none.
    aggregator_args = (
        [*agent_args, "--dashboard", "off"] if tier is not None and tier.serve else None
    )
    status = launcher.run(
        argv,
        runs_dir=resolve_runs_dir(runs_dir, config),
        agent_args=agent_args,
        host=host,
        job_tier=tier,
        aggregator_args=aggregator_args,
        run_id=run_id,
        endpoint=tcp_endpoint(tcp),
        drain_timeout=drain_timeout,
        require_agent=require_agent,
        quiet=quiet,
        dashboard_url=launcher.dashboard_url(board),
        close_allowance=config.sink_close_timeout
        + config.stats.close_timeout
        + launcher.CLOSE_SLACK,
    )
    sys.exit(status)


@main.command()
@runs_dir_option
@click.option(
    "--endpoint", help="ZeroMQ endpoint to bind (default: ipc:// in a private 0700 directory)."
)
@click.option("--tcp", "tcp", metavar="[HOST:]PORT", help="Bind TCP; HOST defaults to 127.0.0.1.")
@click.option(
    "--run-id", help="The run this agent was started for (its run.json is written at once)."
)
@click.option("--meta", help="JSON object merged into the run's run.json (used by `outrider run`).")
@click.option("--ready-fd", type=int, help="Write 'ready' to this file descriptor once bound.")
@click.option(
    "--drain-timeout",
    type=float,
    help="Seconds to keep storing after SIGTERM/SIGINT [default: the config's, 5].",
)
@click.option(
    "--parent-pid",
    type=int,
    help="Exit (after the trainers finish) if this process, the launcher, goes away.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
)
@jobs.host_option
@click.option(
    "--forward-to",
    metavar="HOST:PORT",
    help="Forward window summaries, alerts and accounting to this job aggregator.",
)
@jobs.keys_options
@dashboard_option
@config_options
def agent(
    runs_dir: Path | None,
    endpoint: str | None,
    tcp: str | None,
    run_id: str | None,
    meta: str | None,
    ready_fd: int | None,
    drain_timeout: float | None,
    parent_pid: int | None,
    log_level: str,
    host: str | None,
    forward_to: str | None,
    keys_dir: Path | None,
    insecure: bool,
    dashboard: str | None,
    config_path: Path | None,
    sinks: str | None,
) -> None:
    """Run the agent in the foreground until SIGTERM/SIGINT.

    A first signal drains, stores and exits 0; a second exits at once.
    Trainers reach it by setting OUTRIDER_ENDPOINT to the endpoint printed.
    """
    from agent.arenas import limit_malloc_arenas
    from agent.daemon import Agent, yield_cpu_to_the_trainer
    from agent.ingest.endpoint import default_endpoint

    logging.basicConfig(level=log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if endpoint and tcp:
        raise click.UsageError("give --endpoint or --tcp, not both")
    config = load_config(config_path, sinks)
    board = dashboard_settings(config, dashboard)
    try:
        meta_dict = orjson.loads(meta) if meta else None
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--meta") from None
    if meta_dict is not None and not isinstance(meta_dict, dict):
        raise click.BadParameter("must be a JSON object", param_hint="--meta")
    endpoint = endpoint or tcp_endpoint(tcp) or default_endpoint()
    store_dir = resolve_runs_dir(runs_dir, config).resolve()
    unusable = check_runs_dir(store_dir)
    if unusable is not None:
        raise click.ClickException(f"cannot store runs in {store_dir}: {unusable}")
    forward_to = forward_to or config.aggregation.forward_to
    forwarder = None
    if forward_to is not None:
        config, forwarder = jobs.node_forwarder(config, forward_to, keys_dir, insecure, host)
    yield_cpu_to_the_trainer(config.nice, config.stats.threads)
    limit_malloc_arenas()
    try:
        daemon = Agent(
            endpoint,
            store_dir,
            run_id=run_id,
            meta=meta_dict,
            drain_timeout=config.drain_timeout if drain_timeout is None else drain_timeout,
            parent_pid=parent_pid,
            config=config,
            host=host,
            forwarder=forwarder,
        )
    except Exception as exc:  # zmq.ZMQError for a taken address, OSError for a bad dir
        raise click.ClickException(f"cannot start the agent on {endpoint}: {exc}") from None

    def ready() -> None:
        logging.getLogger("outrider.agent").info(
            "outrider agent listening at %s, runs in %s", endpoint, store_dir
        )
        if ready_fd is not None:
            os.write(ready_fd, b"ready\n")
            os.close(ready_fd)

    sys.exit(serve_beside(board, store_dir, lambda: daemon.serve(ready)))


@main.command()
@runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def runs(runs_dir: Path | None, as_json: bool) -> None:
    """List recorded runs, newest first: id, start, duration, steps, status, drops."""
    runs_dir = resolve_runs_dir(runs_dir)
    try:
        rows = list_runs(runs_dir)
    except OSError as exc:
        raise click.ClickException(f"cannot read runs in {runs_dir}: {describe(exc)}") from None
    if as_json:
        click.echo(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return
    if not rows:
        click.echo(f"no runs in {runs_dir}")
        return
    widths = (-24, -19, 9, 7, -10, 8, 8, 5)
    click.echo(
        _row(("RUN", "START", "DURATION", "STEPS", "STATUS", "RECORDS", "DROPPED", "LOST"), widths)
    )
    for row in rows:
        cells = (
            row["run_id"],
            _time(row.get("start_time")),
            _duration(row.get("duration_s")),
            _blank(row.get("steps")),
            row.get("status") or "?",
            row.get("records", 0),
            row.get("dropped", 0),
            row.get("lost", 0),
        )
        click.echo(_row(cells, widths))


@main.command()
@click.argument("run_name", metavar="RUN")
@runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def show(run_name: str, runs_dir: Path | None, as_json: bool) -> None:
    """Summarise RUN (an id, a unique prefix, or `latest`): metrics and counters."""
    runs_dir = resolve_runs_dir(runs_dir)
    try:
        run_dir = resolve(runs_dir, run_name)
        summary = summarise(run_dir).as_dict()
    except RunNotFound as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, orjson.JSONDecodeError) as exc:
        why = describe(exc) if isinstance(exc, OSError) else f"run.json is not JSON ({exc})"
        raise click.ClickException(f"cannot read run {run_name!r} in {runs_dir}: {why}") from None
    if as_json:
        click.echo(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
        return
    info = summary["info"]
    for label, value in _overview(info, run_dir):
        click.echo(f"{label:<10}{value}")
    if isinstance(info.get("job"), dict):
        for line in jobs.job_lines(info["job"]):
            click.echo(line)
    for stream in info.get("streams", []):
        who = "launcher" if stream["rank"] < 0 else f"rank {stream['rank']}"
        not_stored = sum((stream.get("not_stored") or {}).values())
        click.echo(
            f"  {who:<9} pid {stream['pid']:<7} sent {stream['sent']:>8} "
            f"received {stream['received']:>8} dropped {sum(stream['dropped'].values()):>6} "
            f"lost {stream['lost']:>5} {'complete' if stream['complete'] else 'open'}"
            + (f"  not stored {not_stored}" if not_stored else "")
        )
    if summary["metrics"]:
        widths = (-28, 12, 12, 12, 7)
        click.echo("\n" + _row(("METRIC", "LAST", "MIN", "MAX", "COUNT"), widths))
        for name, metric in summary["metrics"].items():
            cells = (name, _num(metric["last"]), _num(metric["min"]), _num(metric["max"]))
            click.echo(_row((*cells, metric["count"]), widths))
    for text in summary["last_texts"]:
        click.echo(f"\n[{text['name']} @ step {text['step']}]\n{text['text']}")
    if summary["last_alerts"]:
        click.echo(f"\nALERTS (last {len(summary['last_alerts'])}; all in alerts.jsonl)")
        for alert in summary["last_alerts"]:
            step = "" if alert["step"] is None else f" @ step {alert['step']}"
            click.echo(f"  {alert['severity']:<8} {alert['name']}{step}: {alert['message']}")
    if summary["inference"]:
        for line in _inference_lines(summary["inference"]):
            click.echo(line)
    if summary["dashboard"]:
        click.echo(f"\ndashboard {summary['dashboard']}")


def _inference_lines(result: dict[str, Any]) -> list[str]:
    """The last ``probe.benchmark_inference`` result: a row per batch size, then int8."""
    step = "" if result.get("step") is None else f" @ step {result['step']}"
    lines = [
        f"\nINFERENCE{step}  device {result.get('device', '?')}, "
        f"{result.get('iters', '?')} iters, memory: {result.get('memory_source', '?')}"
    ]
    widths = (6, 11, 11, 11, 12, 12)
    lines.append(_row(("BATCH", "P50 MS", "P90 MS", "P99 MS", "SAMPLES/S", "PEAK MIB"), widths))
    batches = result.get("batches")
    for row in batches if isinstance(batches, list) else []:
        if isinstance(row, dict):
            cells = [_scaled(row.get(f"latency_{p}_seconds"), 1e3) for p in ("p50", "p90", "p99")]
            speed = _scaled(row.get("samples_per_second"), 1, ".0f")
            memory = _scaled(row.get("peak_memory_bytes"), 1 / 2**20)
            lines.append(_row((row.get("batch_size", "?"), *cells, speed, memory), widths))
    quantized = result.get("quantized")
    if isinstance(quantized, dict) and quantized.get("status") == "done":
        q = quantized
        agreement = q.get("top1_agreement")
        lines.append(
            f"int8 dynamic ({q.get('engine')}): size {_scaled(q.get('size_bytes_fp32'), 1 / 2**20)}"
            f" -> {_scaled(q.get('size_bytes_int8'), 1 / 2**20)} MiB"
            f" (x{_scaled(q.get('size_ratio'), 1)}), batch-1 p50"
            f" {_scaled(q.get('latency_p50_seconds_fp32'), 1e3)}"
            f" -> {_scaled(q.get('latency_p50_seconds_int8'), 1e3)} ms,"
            f" max abs diff {_scaled(q.get('max_abs_diff'), 1)}"
            + ("" if agreement is None else f", top-1 agreement {_scaled(agreement, 100)}%")
        )
    elif isinstance(quantized, dict):
        lines.append(f"int8 dynamic: skipped ({quantized.get('reason')})")
    if result.get("error"):
        lines.append(f"error: {result['error']}")
    return lines


def _scaled(value: Any, factor: float, spec: str = ".4g") -> str:
    """A stored number in display units; "-" for anything that is not a number."""
    if type(value) not in (int, float):
        return "-"
    return format(value * factor, spec)


def _overview(info: dict[str, Any], run_dir: Path) -> list[tuple[str, str]]:
    git = info.get("git") or {}
    command = info.get("command") or (info.get("trainer") or {}).get("argv") or []
    lines = [
        (
            "run",
            f"{info.get('run_id')}  ({info.get('status')}, exit {_blank(info.get('exit_status'))})",
        ),
        ("dir", str(run_dir)),
        ("command", " ".join(command)),
        ("started", f"{_time(info.get('start_time'))}  duration {_duration(_span(info))}"),
        ("host", f"{info.get('host')}  python {info.get('python')}  torch {info.get('torch')}"),
        (
            "records",
            f"{info.get('records', 0)}  dropped {info.get('dropped', 0)}"
            f"  lost {info.get('lost', 0)}",
        ),
    ]
    not_stored = info.get("not_stored") or {}
    store = info.get("store") or {}
    if not_stored or store.get("failures"):
        reasons = ", ".join(f"{reason} {count}" for reason, count in sorted(not_stored.items()))
        failing = f"; failing: {store['failing']}" if store.get("failing") else ""
        lines.append(
            (
                "store",
                f"{sum(not_stored.values())} received records not stored"
                f"{f' ({reasons})' if reasons else ''}{failing}",
            )
        )
    if git:
        lines.append(
            ("git", f"{git.get('commit', '')[:12]}{' (dirty)' if git.get('dirty') else ''}")
        )
    return lines


def _row(cells: tuple[Any, ...], widths: tuple[int, ...]) -> str:
    """One table row; a negative width left-aligns the column."""
    return " ".join(
        f"{cell!s:<{-width}}" if width < 0 else f"{cell!s:>{width}}"
        for cell, width in zip(cells, widths, strict=True)
    )


main.add_command(jobs.aggregator)
main.add_command(simulate.simulate_command())
main.add_command(top.top_command())
main.add_command(compare.compare_command())
main.add_command(replay.replay_command())
main.add_command(report.report_command())
main.add_command(export_command)
main.add_command(dashboard_command)


@main.command("config")
@click.option(
    "--check",
    "check_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Validate this agent config; errors name the key and line.",
)
@click.option(
    "--default", "show_default", is_flag=True, help="Print the documented default config."
)
def config_command(check_path: Path | None, show_default: bool) -> None:
    """Check an agent configuration file, or print the default one.

    \b
      outrider config --default > agent.yaml
      outrider config --check agent.yaml
    """
    if show_default or check_path is None:
        click.echo(agent_config.DEFAULT_YAML, nl=False)
        return
    try:
        config = agent_config.load(check_path)
    except agent_config.ConfigError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    sinks = ", ".join(config.enabled_sinks()) or "none"
    click.echo(f"{check_path}: ok (sinks: {sinks})")


@main.command("keys")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Replace keys that already exist in DIRECTORY.")
def keys_command(directory: Path, force: bool) -> None:
    """Make the CURVE keys that let nodes talk to the job aggregator.

    \b
    DIRECTORY gets two key pairs (the directory 0700, secret files 0600):
      aggregator.key_secret  stays with the aggregator
      aggregator.key         public: copy to every node
      node.key_secret        copy to every node (its identity)
      node.key               public: the aggregator trusts it
    \b
    The aggregator needs aggregator.key_secret and the nodes' public keys:
    it trusts every *.key file in its keys directory (add one per node if
    you make per-node pairs). Each node needs node.key_secret and
    aggregator.key in its own keys directory. Plain TCP without keys is
    only allowed on loopback.
    """
    from agent.aggregation.keys import create_keys

    try:
        made = create_keys(directory, force=force)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"keys written to {made.directory}:")
    click.echo(f"  aggregator: {made.aggregator_secret.name} (secret) and the nodes' *.key")
    click.echo(f"  each node:  {made.node_secret.name} (secret) and {made.aggregator_public.name}")


def _span(info: dict[str, Any]) -> float | None:
    start, end = info.get("start_time"), info.get("end_time")
    return end - start if start and end else None


def _time(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _blank(value: Any) -> str:
    return "-" if value is None else str(value)


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.6g}"
