"""`outrider export` on a run stored by a real agent: wide and long tables, CSV, JSON and
parquet, metric subsets, and clear errors."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import orjson
import pytest

from tests.helpers import outrider
from tests.stored_run import NAN_STEP, STEPS, VAL_EVERY, loss_at, store_runs


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("export") / "runs"
    store_runs(runs, "exported")
    return runs


def export(runs_dir: Path, *args: str) -> str:
    done = outrider("export", "exported", "--runs-dir", str(runs_dir), *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_wide_csv_has_a_row_per_step_and_the_chosen_metrics(runs_dir: Path) -> None:
    """Wide CSV: a row per step, the metrics matched by --metrics, blanks where not logged,
    and the NaN loss spelled as stored."""
    rows = list(
        csv.reader(io.StringIO(export(runs_dir, "--metrics", "loss", "--metrics", "val/*")))
    )
    assert rows[0] == ["step", "rank", "time", "loss", "val/loss"]
    body = rows[1:]
    assert [int(row[0]) for row in body] == list(range(STEPS))
    assert body[NAN_STEP][3] == "NaN"
    assert float(body[7][3]) == pytest.approx(loss_at(7))
    assert [row[4] != "" for row in body] == [step % VAL_EVERY == 0 for step in range(STEPS)]


def test_long_json_has_a_row_per_value(runs_dir: Path) -> None:
    """Long JSON: one object per stored value, as many as were logged."""
    rows = orjson.loads(
        export(runs_dir, "--format", "json", "--layout", "long", "--metrics", "*loss")
    )
    assert {row["metric"] for row in rows} == {"loss", "val/loss"}
    assert len(rows) == STEPS + STEPS // VAL_EVERY
    assert set(rows[0]) == {"step", "rank", "time", "metric", "value"}
    nan = [row for row in rows if row["metric"] == "loss" and row["step"] == NAN_STEP]
    assert nan[0]["value"] == "NaN"


def test_parquet_reads_back_with_pyarrow(runs_dir: Path, tmp_path: Path) -> None:
    """Parquet --out: pyarrow reads the same table back, NaN as a real NaN, steps as integers."""
    pq = pytest.importorskip("pyarrow.parquet")
    out = tmp_path / "run.parquet"
    done = outrider(
        "export", "exported", "--runs-dir", str(runs_dir), "--format", "parquet", "--out", str(out)
    )
    assert done.returncode == 0, done.stderr
    table = pq.read_table(out).to_pydict()
    assert table["step"] == list(range(STEPS))
    assert {"loss", "lr", "val/loss"} <= set(table)
    assert math.isnan(table["loss"][NAN_STEP])
    assert table["val/loss"][1] is None


def test_help_names_formats_layouts_and_patterns() -> None:
    """--help says what the options do."""
    done = outrider("export", "--help")
    assert done.returncode == 0
    for word in ("csv|json|parquet", "wide|long", "--metrics", "--out", "--rank"):
        assert word in done.stdout


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("missing",), 1, "no run 'missing'"),
        (("exported", "--format", "parquet"), 2, "give --out FILE"),
        (("exported", "--metrics", "nothing*"), 1, "no metric of run exported matches"),
    ],
)
def test_user_faults_are_one_clear_line(
    runs_dir: Path, args: tuple[str, ...], code: int, says: str
) -> None:
    """An unknown run, parquet to a terminal, or a pattern matching nothing: a message, no
    traceback."""
    done = outrider("export", *args, "--runs-dir", str(runs_dir))
    assert done.returncode == code
    assert says in done.stderr
    assert "Traceback" not in done.stderr
