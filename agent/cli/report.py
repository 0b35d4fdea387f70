"""``outrider report RUN``: a stored run as one offline HTML page and PNG charts."""

from __future__ import annotations

from pathlib import Path

import click
import orjson

from agent.store.disk import describe
from agent.store.runs import RunNotFound, resolve


def report_command() -> click.Command:
    """The `report` command; built on call, as its options are `agent.cli.commands`' own."""
    from agent.cli.commands import resolve_runs_dir, runs_dir_option

    @click.command(
        "report",
        help="""Write a report of RUN (an id, a unique prefix, `latest`, or jobs/<id>).

One self-contained HTML file (charts embedded, no network needed to open
it) and the charts as PNGs, with these sections: summary, training
progress, validation, resource use, alerts, convergence analysis (loss
reduction, best step, noise and spikes, loss per 1k steps and per minute,
still improving or flat at the end) and recommendations drawn from the run
(input-bound -> more loader workers, GPU under-used, LR too high, memory
near the limit, a straggler rank, ...), each with the numbers behind it.
A section the run has no data for says what to log to fill it.

\b
  outrider report latest                  # -> <run dir>/report/report.html
  outrider report 20261125-1204 --out /tmp/r
  outrider report latest --json | jq '.recommendations[].rule'
\b
Thresholds and rules: docs/reports.md.
""",
    )
    @click.argument("run_name", metavar="RUN")
    @click.option(
        "--out",
        "out_dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory to write report.html and the PNGs into [default: <run dir>/report].",
    )
    @click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print the report's figures and the files written as JSON instead of text.",
    )
    @runs_dir_option
    def report(run_name: str, out_dir: Path | None, as_json: bool, runs_dir: Path | None) -> None:
        from agent.reports.report import build, write

        store = resolve_runs_dir(runs_dir)
        try:
            run_dir = resolve(store, run_name)
            built = build(run_dir)
        except RunNotFound as exc:
            raise click.ClickException(str(exc)) from None
        except (OSError, orjson.JSONDecodeError) as exc:
            why = describe(exc) if isinstance(exc, OSError) else f"run.json is not JSON ({exc})"
            raise click.ClickException(f"cannot read run {run_name!r} in {store}: {why}") from None
        target = out_dir if out_dir is not None else run_dir / "report"
        try:
            files = write(built, target)
        except OSError as exc:
            raise click.ClickException(
                f"cannot write the report to {target}: {describe(exc)}; choose another "
                "directory with --out"
            ) from None
        if as_json:
            payload = {**built.as_dict(), "files": [str(path) for path in files]}
            click.echo(orjson.dumps(payload, option=orjson.OPT_INDENT_2).decode())
            return
        click.echo(f"report of run {built.run_id} written to {target}")
        for path in files:
            click.echo(f"  {path.name:<18} {path.stat().st_size / 1024:>8.0f} KiB")
        click.echo(f"open {files[0]} in a browser (self-contained: charts embedded)")
        if built.recommendations:
            click.echo(f"\nRECOMMENDATIONS ({len(built.recommendations)})")
            for found in built.recommendations:
                click.echo(f"  {found.severity:<8} {found.title}: {found.finding}")
        else:
            click.echo("\nno recommendations: no rule found a problem in what this run logged")

    return report
