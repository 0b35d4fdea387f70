"""``outrider compare RUN RUN ...``: best and final metrics side by side, config differences,
overlaid curves (terminal, ``--html``, ``--json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click


def compare_command() -> click.Command:
    """The `compare` command; built on call, as its options are `agent.cli.commands`' own."""
    from agent.cli.commands import resolve_runs_dir, runs_dir_option

    @click.command("compare")
    @click.argument("run_names", metavar="RUN RUN...", nargs=-1, required=True)
    @runs_dir_option
    @click.option(
        "--metrics",
        "patterns",
        multiple=True,
        metavar="PATTERN",
        help="Only metrics matching these shell patterns (repeat, or comma-separate: "
        "`--metrics 'loss,val/*'`). Default: every metric but the host's system/*.",
    )
    @click.option(
        "--html",
        "html_path",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Also write one self-contained HTML page (tables and overlaid curves as "
        "embedded images) to this file.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
    def compare(
        run_names: tuple[str, ...],
        runs_dir: Path | None,
        patterns: tuple[str, ...],
        html_path: Path | None,
        as_json: bool,
    ) -> None:
        """Compare stored runs: each metric's best and final value per run, the configs'
        differences, and the curves.

        RUN is an id, a unique prefix, `latest`, or an aggregator's `jobs/ID`. A metric's
        best is its minimum for loss-like names (loss, perplexity, error, seconds, ...)
        and its maximum for accuracy-like ones (acc, f1, reward, per_second, ...); other
        metrics show no best. Values are the lowest rank's (rank 0).

        \b
          outrider compare run-a run-b
          outrider compare run-a run-b --metrics 'loss,val/*' --html compare.html
          outrider compare run-a run-b --json
        """
        import orjson

        from agent.reports.compare import compare as compare_runs
        from agent.reports.compare import to_html
        from agent.store.series import name_filter

        runs_dir = resolve_runs_dir(runs_dir)
        runs = _resolve_all(runs_dir, run_names)
        wanted = [p for pattern in patterns for p in pattern.split(",") if p]
        try:
            comparison = compare_runs(runs, name_filter(wanted))
        except OSError as exc:
            raise click.ClickException(f"cannot read the runs: {exc}") from None
        except orjson.JSONDecodeError as exc:
            raise click.ClickException(f"a run.json is not JSON: {exc}") from None
        if not comparison.names:
            what = f"matching {', '.join(wanted)}" if wanted else "at all"
            raise click.ClickException(f"no metrics {what} in these runs")
        if html_path is not None:
            try:
                html_path.write_text(to_html(comparison))
            except OSError as exc:
                raise click.ClickException(f"cannot write {html_path}: {exc.strerror}") from None
        if as_json:
            click.echo(orjson.dumps(comparison.as_dict(), option=orjson.OPT_INDENT_2).decode())
            return
        _print_tables(comparison)
        if html_path is not None:
            click.echo(f"\nwrote {html_path}")

    return compare


def _resolve_all(runs_dir: Path, names: tuple[str, ...]) -> list[tuple[str, Path]]:
    from agent.store.runs import RunNotFound, resolve

    runs: list[tuple[str, Path]] = []
    for name in names:
        try:
            run_dir = resolve(runs_dir, name)
        except RunNotFound as exc:
            raise click.ClickException(str(exc)) from None
        label = str(run_dir.relative_to(runs_dir)) if run_dir.is_relative_to(runs_dir) else name
        if any(label == seen for seen, _ in runs):
            raise click.UsageError(f"run {label} is given twice")
        runs.append((label, run_dir))
    if len(runs) < 2:
        raise click.UsageError("give at least two runs to compare")
    return runs


def _num(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.5g}"
    return str(value)


def _print_tables(comparison: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    from agent.reports.compare import RULE_TEXT, sparklines

    console = Console(markup=False, highlight=False, width=None if _is_tty() else 160)
    runs = Table(title="runs", title_justify="left", box=None, pad_edge=False)
    for column in ("RUN", "STATUS", "LAST STEP", "DURATION", "GIT"):
        runs.add_column(column, justify="left" if column in ("RUN", "STATUS", "GIT") else "right")
    for run in comparison.runs:
        view = run.overview()
        commit = view["git_commit"][:12] if isinstance(view["git_commit"], str) else "-"
        duration = "-" if view["duration_s"] is None else f"{view['duration_s']:.0f} s"
        runs.add_row(run.name, str(view["status"]), _num(view["last_step"]), duration, commit)
    console.print(runs)

    metrics = Table(
        title="metrics", title_justify="left", caption=RULE_TEXT, caption_justify="left", box=None
    )
    for column in ("METRIC", "RUN", "BEST", "AT STEP", "FINAL", "AT STEP", "CURVE (shared scale)"):
        metrics.add_column(column, justify="left" if column in ("METRIC", "RUN") else "right")
    for name in comparison.names:
        curves = sparklines(comparison, name)
        rule = comparison.rules[name]
        first = True
        for run in comparison.runs:
            result = run.metrics.get(name)
            label = f"{name} ({rule})" if first else ""
            first = False
            if result is None:
                metrics.add_row(label, run.name, "-", "", "-", "", "")
                continue
            metrics.add_row(
                label,
                run.name,
                _num(result.best),
                _num(result.best_step) if result.best is not None else "",
                _num(result.final),
                _num(result.final_step),
                curves.get(run.name, ""),
            )
        metrics.add_section()
    console.print()
    console.print(metrics)

    console.print()
    if not comparison.config_diff:
        console.print("config: the same in every run")
        return
    config = Table(title="config differences", title_justify="left", box=None)
    config.add_column("KEY")
    for run in comparison.runs:
        config.add_column(run.name)
    for key, values in comparison.config_diff.items():
        config.add_row(key, *(_num(values[run.name]) for run in comparison.runs))
    console.print(config)


def _is_tty() -> bool:
    import sys

    return sys.stdout.isatty()
