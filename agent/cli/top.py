"""``outrider top``: a live table of the runs on this machine (or a job's ranks), per run and
per rank, redrawn every second in the terminal (plain text, so it works over SSH)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from agent.reports.top import Top


def top_command() -> click.Command:
    """The `top` command; built on call, as its options are `agent.cli.commands`' own."""
    from agent.cli.commands import resolve_runs_dir, runs_dir_option

    @click.command("top")
    @runs_dir_option
    @click.option(
        "--run",
        "focus",
        multiple=True,
        metavar="RUN",
        help="Only this run (id, unique prefix, `latest`, or an aggregator's `jobs/ID`); "
        "repeatable. Default: every run going on now, else the newest run.",
    )
    @click.option("--interval", default=1.0, show_default=True, help="Seconds between two frames.")
    @click.option(
        "--alert-window",
        default=300.0,
        show_default=True,
        help="Seconds an alert is shown as active after it fired (the rules' cooldown).",
    )
    @click.option(
        "--once", is_flag=True, help="Print one frame and exit (also what a non-terminal gets)."
    )
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON snapshot and exit.")
    def top(
        runs_dir: Path | None,
        focus: tuple[str, ...],
        interval: float,
        alert_window: float,
        once: bool,
        as_json: bool,
    ) -> None:
        """Watch the runs going on now: per run and per rank, the step, steps/s, last loss
        and gradient norm, GPU utilisation and memory, the trainer's CPU and memory,
        active alerts and status.

        It reads the run store the agents write (run.json, metrics.jsonl), so it needs
        no connection to an agent and works over SSH wherever the runs directory is.
        On a node that runs the job aggregator, `--run jobs/ID` shows every rank of the
        job. Steps/s is each rank's pace over its last 30 s of records; a run's row
        shows its slowest rank's, and the mean of its ranks' losses. Ctrl-C quits.

        \b
          outrider top
          outrider top --run jobs/job7
          outrider top --once          # one frame, for scripts
          outrider top --json          # one snapshot as JSON
        """
        import orjson

        from agent.reports.top import Top
        from agent.store.runs import RunNotFound

        model = Top(resolve_runs_dir(runs_dir), list(focus), alert_window=alert_window)
        try:
            model.refresh()
        except RunNotFound as exc:
            raise click.ClickException(str(exc)) from None
        if as_json:
            click.echo(orjson.dumps(model.snapshot(), option=orjson.OPT_INDENT_2).decode())
            return
        if once or not sys.stdout.isatty():
            _console(plain=True).print(frame(model.snapshot()))
            return
        _live(model, max(interval, 0.1))

    return top


def _console(plain: bool = False) -> Console:
    from rich.console import Console

    if plain:
        return Console(markup=False, highlight=False, width=160, color_system=None)
    return Console(markup=False, highlight=False)


def _live(model: Top, interval: float) -> None:
    from rich.live import Live

    console = _console()
    try:
        with Live(frame(model.snapshot()), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                model.refresh()
                live.update(frame(model.snapshot()), refresh=True)
    except KeyboardInterrupt:
        pass


def _num(value: Any, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    return format(value, spec)


def _gib(used: float | None, total: float | None) -> str:
    if used is None:
        return "-"
    if total:
        return f"{used / 2**30:.1f}/{total / 2**30:.0f}G"
    return f"{used / 2**30:.1f}G"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def frame(snapshot: dict[str, Any]) -> Table:
    """One frame: a row per run, then a row per rank under it."""
    from rich.table import Table

    stamp = time.strftime("%H:%M:%S", time.localtime(snapshot["time"]))
    table = Table(
        title=f"outrider top  {snapshot['runs_dir']}  {stamp}",
        title_justify="left",
        box=None,
        header_style="bold",
    )
    columns = (
        "RUN / RANK",
        "HOST",
        "STEP",
        "STEPS/S",
        "LOSS",
        "GRAD NORM",
        "GPU",
        "GPU %",
        "GPU MEM",
        "CPU %",
        "RSS",
        "LAST",
        "ALERTS",
        "STATUS",
    )
    for column in columns:
        left = column in ("RUN / RANK", "HOST", "ALERTS", "STATUS")
        table.add_column(column, justify="left" if left else "right", no_wrap=column != "ALERTS")
    if not snapshot["runs"]:
        table.add_row("no runs", *[""] * (len(columns) - 1))
        return table
    for run in snapshot["runs"]:
        table.add_row(
            run["run"],
            "",
            _num(run["step"], "d"),
            _num(run["steps_per_second"], ".3g"),
            _num(run["loss"]),
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            ", ".join(run["alerts"]),
            run["status"],
            style="bold",
        )
        for rank in run["ranks"]:
            rss = rank["rss_bytes"]
            table.add_row(
                f"  rank {rank['rank']}",
                rank["host"] or "",
                _num(rank["step"], "d"),
                _num(rank["steps_per_second"], ".3g"),
                _num(rank["loss"]),
                _num(rank["grad_norm"]),
                _num(rank["gpu"], "d"),
                _num(rank["gpu_util_percent"], ".0f"),
                _gib(rank["gpu_memory_used_bytes"], rank["gpu_memory_total_bytes"]),
                _num(rank["cpu_percent"], ".0f"),
                "-" if rss is None else f"{rss / 2**20:.0f}M",
                _age(rank["last_record_age_s"]),
                ", ".join(rank["alerts"]),
                rank["status"],
            )
        table.add_section()
    return table
