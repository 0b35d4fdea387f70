"""``outrider export``: a stored run's metrics as CSV, JSON or parquet."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from agent.reports.export import FORMATS, LAYOUTS, ExportError, Format, Layout, table, write
from agent.store.disk import describe
from agent.store.runs import RunNotFound, resolve


@click.command("export")
@click.argument("run_name", metavar="RUN")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    default="csv",
    show_default=True,
    help="parquet needs pyarrow (pip install 'outrider[parquet]') and --out.",
)
@click.option(
    "--layout",
    type=click.Choice(LAYOUTS),
    default="wide",
    show_default=True,
    help="wide: a row per step and rank, a column per metric (points without a step, "
    "such as system/..., are left out); long: a row per value (step, rank, time, metric, value).",
)
@click.option(
    "--metrics",
    "patterns",
    multiple=True,
    metavar="PATTERN",
    help="Only metrics matching this shell pattern (loss, 'val/*'); repeat for more.",
)
@click.option("--rank", type=int, help="Only this rank's points [default: every rank].")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write to this file [default: stdout for csv and json].",
)
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OUTRIDER_RUNS_DIR",
    show_envvar=True,
    default=Path("outrider-runs"),
    help="Where runs are stored.",
)
def export_command(
    run_name: str,
    fmt: Format,
    layout: Layout,
    patterns: tuple[str, ...],
    rank: int | None,
    out: Path | None,
    runs_dir: Path,
) -> None:
    """Write RUN's metrics (an id, a unique prefix, or `latest`) as a table.

    \b
      outrider export latest > run.csv
      outrider export latest --metrics loss --metrics 'val/*' --format json
      outrider export 20261125-1204 --layout long --format parquet --out run.parquet
    A live run is exported as stored so far. Non-finite values keep their
    spellings (NaN, Infinity); a metric not logged at a step is an empty cell.
    """
    if fmt == "parquet" and out is None:
        raise click.UsageError("--format parquet writes a binary file: give --out FILE")
    from agent.store.series import RunLog, name_filter  # numpy: imported only to export

    try:
        run_dir = resolve(runs_dir, run_name)
        log = RunLog.read(run_dir, name_filter(list(patterns)))
    except RunNotFound as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot read run {run_name!r}: {describe(exc)}") from None
    if patterns and not log.series:
        raise click.ClickException(
            f"no metric of run {run_dir.name} matches {', '.join(patterns)}"
            " (`outrider show` lists them)"
        )
    data = table(log, layout, rank)
    try:
        if out is None:
            write(data, fmt, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        else:
            with open(out, "wb") as file:
                write(data, fmt, file)
    except BrokenPipeError:  # `outrider export ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    except ExportError as exc:
        if out is not None:
            out.unlink(missing_ok=True)
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out or 'stdout'}: {describe(exc)}") from None
    if out is not None:
        click.echo(f"{len(data.rows)} rows, {len(data.columns)} columns -> {out}", err=True)
