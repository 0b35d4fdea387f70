"""``outrider replay RUN``: send a stored run into sinks later, with its original steps and
times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from agent.config import DEFAULT_SINKS, AgentConfig, SinkSettings


def apply_settings(config: AgentConfig, assignments: tuple[str, ...]) -> AgentConfig:
    """``--set SINK.OPTION=VALUE`` onto the config's sink options (VALUE read as YAML)."""
    import yaml

    from agent.reports.replay import with_options
    from sinks import registry

    sinks = dict(config.sinks)
    for assignment in assignments:
        key, equals, raw = assignment.partition("=")
        name, dot, option = key.partition(".")
        if not (equals and dot and name and option):
            raise click.BadParameter(
                f"{assignment!r} is not SINK.OPTION=VALUE (e.g. tensorboard.logdir=/tmp/tb)",
                param_hint="--set",
            )
        if name not in sinks and name not in registry.known_names():
            raise click.BadParameter(
                f"unknown sink {name!r}; known: {', '.join(registry.known_names())}",
                param_hint="--set",
            )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        settings = sinks.get(name) or SinkSettings(enabled=name in DEFAULT_SINKS)
        sinks[name] = with_options(settings, {**settings.options(), option: value})
    return config.model_copy(update={"sinks": sinks})


def replay_command() -> click.Command:
    """The `replay` command; built on call, as its options are `agent.cli.commands`' own."""
    from agent.cli.commands import config_options, load_config, resolve_runs_dir, runs_dir_option

    @click.command("replay")
    @click.argument("run_name", metavar="RUN")
    @runs_dir_option
    @config_options
    @click.option(
        "--set",
        "assignments",
        multiple=True,
        metavar="SINK.OPTION=VALUE",
        help="A sink option for this replay, over --config (repeatable): "
        "tensorboard.logdir=DIR, wandb.mode=online, wandb.project=NAME, ...",
    )
    @click.option(
        "--as",
        "as_run",
        metavar="RUN_ID",
        help="The run's id in the sinks (a new W&B run, a new TensorBoard run directory); "
        "default: its stored id.",
    )
    @click.option(
        "--timeout",
        default=60.0,
        show_default=True,
        help="Seconds each sink may take to flush and close (a W&B upload).",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print what was sent as JSON.")
    def replay(
        run_name: str,
        runs_dir: Path | None,
        config_path: Path | None,
        sinks: str | None,
        assignments: tuple[str, ...],
        as_run: str | None,
        timeout: float,
        as_json: bool,
    ) -> None:
        """Send stored RUN into sinks, as if it were happening now but with its original
        steps and times: an offline run to W&B online, a run to a new TensorBoard
        directory, a finished run to a sink added since.

        RUN is an id, a unique prefix, `latest`, or an aggregator's `jobs/ID`. Sinks and
        their options come from --config and --sinks as for `outrider run`; --set
        changes one option for this replay. W&B gets a history row for every step
        unless the config sets wandb.rows_per_second. Prometheus and OTLP show the
        present, not a history, and are refused.

        \b
          outrider replay RUN --sinks tensorboard --set tensorboard.logdir=./tb
          outrider replay RUN --sinks wandb --set wandb.mode=online --set wandb.project=p
          outrider replay RUN --sinks wandb --as RUN-replayed --json
        """
        import orjson

        from agent.ingest.decode import RUN_ID
        from agent.reports import replay as replaying
        from agent.store.runs import RunNotFound, load_info, resolve

        config = load_config(config_path, sinks)
        config = replaying.replay_config(apply_settings(config, assignments))
        runs_dir = resolve_runs_dir(runs_dir, config)
        try:
            run_dir = resolve(runs_dir, run_name)
        except RunNotFound as exc:
            raise click.ClickException(str(exc)) from None
        if as_run is not None and not RUN_ID.match(as_run):
            raise click.BadParameter(
                "a run id is letters, digits, '.', '_' and '-' (up to 128)", param_hint="--as"
            )
        try:
            info = load_info(run_dir)
        except (OSError, orjson.JSONDecodeError) as exc:
            raise click.ClickException(f"cannot read {run_dir / 'run.json'}: {exc}") from None
        run_id = as_run or str(info.get("run_id") or run_dir.name)
        named = [s for s in sinks.split(",") if s and s != "none"] if sinks is not None else None
        try:
            names, skipped = replaying.pick_sinks(config, named)
            if not names:
                raise replaying.ReplayError(
                    "no sink to replay into: name them with --sinks (e.g. --sinks tensorboard)"
                )
            replaying.check_targets(config, names, run_dir)
            targets = replaying.build_sinks(config, names, runs_dir, run_id, run_dir)
        except replaying.ReplayError as exc:
            raise click.ClickException(str(exc)) from None
        done = replaying.replay(run_dir, targets, run_id=run_id, close_timeout=timeout)
        done.skipped = skipped
        result = done.as_dict()
        if as_json:
            click.echo(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())
        else:
            _print(result)
        if any(target.error for target in targets):
            raise SystemExit(1)

    return replay


def _print(result: dict[str, Any]) -> None:
    click.echo(
        f"replayed run {result['run_id']} ({result['lines']} stored lines in "
        f"{result['batches']} batches) from {result['run_dir']}"
    )
    for sink in result["sinks"]:
        state = f"FAILED: {sink['error']}" if sink["error"] else "ok"
        counters = {k: v for k, v in sink["counters"].items() if v}
        extra = f"  {counters}" if counters else ""
        click.echo(
            f"  {sink['sink']:<12} {state}: {sink['entries']} entries in {sink['batches']} "
            f"batches, {sink['seconds']:.1f} s -> {sink['target']}{extra}"
        )
    for name, why in result["skipped"].items():
        click.echo(f"  {name:<12} not replayed: {why}")
