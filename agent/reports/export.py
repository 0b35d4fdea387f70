"""A stored run's metrics as a table: what ``outrider export`` and the dashboard's
downloads write.

Two layouts. **wide**: one row per (step, rank), a column per metric, an empty cell where
a metric was not logged at that step; points logged without a step (host samples,
``system/...``) have no row to go in and are left out. **long**: one row per value
(``step, rank, time, metric, value``), every point included. Values keep their
non-finite spellings (``NaN``, ``Infinity``) in CSV and JSON, and are real IEEE values in
parquet; a missing cell is empty in CSV, ``null`` in JSON and parquet.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

import orjson

from sinks import schema

if TYPE_CHECKING:  # the log's reader (and its numpy) is the caller's to import
    from agent.store.series import RunLog

Format = Literal["csv", "json", "parquet"]
Layout = Literal["wide", "long"]
FORMATS: tuple[Format, ...] = ("csv", "json", "parquet")
LAYOUTS: tuple[Layout, ...] = ("wide", "long")
LONG_COLUMNS = ("step", "rank", "time", "metric", "value")


class ExportError(RuntimeError):
    """The export cannot be written (say, parquet without pyarrow); the message says why."""


@dataclass
class Table:
    """Column names and rows of cells (numbers, strings, or None for a missing cell)."""

    columns: list[str]
    rows: list[list[Any]]


def table(log: RunLog, layout: Layout = "wide", rank: int | None = None) -> Table:
    """The run's series (already limited by the log's name filter) in ``layout``; one rank's
    points only when ``rank`` is given."""
    return _long(log, rank) if layout == "long" else _wide(log, rank)


def _points(log: RunLog, rank: int | None) -> Iterator[tuple[str, float, float, float, int]]:
    for name in log.metric_names():
        series = log.series[name]
        for step, t, value, point_rank in zip(
            series.steps, series.times, series.values, series.ranks, strict=True
        ):
            if rank is None or point_rank == rank:
                yield name, step, t, value, point_rank


def _wide(log: RunLog, rank: int | None) -> Table:
    names = [n for n in log.metric_names() if any(not math.isnan(s) for s in log.series[n].steps)]
    column = {name: index for index, name in enumerate(names, start=3)}
    rows: dict[tuple[float, int], list[Any]] = {}
    for name, step, t, value, point_rank in _points(log, rank):
        if math.isnan(step) or name not in column:
            continue
        row = rows.get((step, point_rank))
        if row is None:
            row = rows[(step, point_rank)] = [_step(step), point_rank, t, *([None] * len(names))]
        elif t < row[2]:
            row[2] = t  # the row's time: when its first value was logged
        row[column[name]] = value
    ordered = [rows[key] for key in sorted(rows)]
    return Table(["step", "rank", "time", *names], ordered)


def _long(log: RunLog, rank: int | None) -> Table:
    rows = [
        [None if math.isnan(step) else _step(step), point_rank, t, name, value]
        for name, step, t, value, point_rank in _points(log, rank)
    ]
    rows.sort(key=lambda row: (row[2], row[3]))
    return Table(list(LONG_COLUMNS), rows)


def _step(step: float) -> int | float:
    return int(step) if step.is_integer() else step


def write(data: Table, fmt: Format, out: IO[bytes]) -> None:
    """``data`` as ``fmt`` into the binary stream ``out``."""
    writers: dict[str, Callable[[Table, IO[bytes]], None]] = {
        "csv": _csv,
        "json": _json,
        "parquet": _parquet,
    }
    writers[fmt](data, out)


def _cell(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return schema.encode_number(value)
    return value


def _csv(data: Table, out: IO[bytes]) -> None:
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=True)
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(data.columns)
    for row in data.rows:
        writer.writerow(["" if cell is None else _cell(cell) for cell in row])
    text.detach()


def _json(data: Table, out: IO[bytes]) -> None:
    """A JSON array of row objects, one row a line (so ``head`` shows something useful)."""
    out.write(b"[")
    columns = data.columns
    for index, row in enumerate(data.rows):
        out.write(b"\n" if index == 0 else b",\n")
        out.write(orjson.dumps({c: _cell(v) for c, v in zip(columns, row, strict=True)}))
    out.write(b"\n]\n")


def _parquet(data: Table, out: IO[bytes]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ExportError(
            "parquet needs pyarrow: pip install 'outrider[parquet]' (or use --format csv|json)"
        ) from None
    arrays = []
    for index, name in enumerate(data.columns):
        cells = [row[index] for row in data.rows]
        if name == "metric":
            arrays.append(pa.array(cells, type=pa.string()))
        elif name == "rank" or (name == "step" and all(type(c) is not float for c in cells)):
            arrays.append(pa.array(cells, type=pa.int64()))
        else:
            arrays.append(pa.array(cells, type=pa.float64()))
    pq.write_table(pa.Table.from_arrays(arrays, names=data.columns), out)
