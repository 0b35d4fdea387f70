"""agent.analysis.dashboard: the training dashboard PNG."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import pytest

from agent.analysis import dashboard
from agent.analysis.dashboard import render_dashboard
from tests.helpers import REPO

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    length, kind = struct.unpack(">I4s", data[8:16])
    assert (length, kind) == (13, b"IHDR")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def small_history() -> dict[str, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    steps = np.arange(200, dtype=np.float64)
    return {
        "loss": (steps, 3.0 * np.exp(-steps / 50) + 0.1),
        "val/loss": (steps[::50], 3.0 * np.exp(-steps[::50] / 50) + 0.2),
        "lr": (steps, np.full(200, 1e-3)),
        "grad_norm": (steps, 1.0 + steps / 100),
        "tokens_per_second": (steps, np.full(200, 4e4)),
        "window/tokens_per_second": (steps[99::100], np.full(2, 4e4)),
        "cuda_memory_allocated_bytes": (steps, np.full(200, 5e9)),
        "system/process/0/rss_bytes": (steps, np.full(200, 2e9)),
        "features/student/effective_rank": (steps[::20], np.linspace(100, 50, 10)),
    }


def test_renders_png_of_the_documented_size(tmp_path: Path) -> None:
    """A full history replaces the old file with a valid 1200x700 PNG, leaving no temp file."""
    (tmp_path / "dash.png").write_bytes(b"old")
    out = render_dashboard(small_history(), tmp_path / "dash.png", "run abc")
    assert out == tmp_path / "dash.png"
    assert png_size(out) == (1200, 700)
    assert [p.name for p in tmp_path.iterdir()] == ["dash.png"]


def test_empty_history_and_nonfinite_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Panels without finite data say "no data"; NaN/inf and odd series still give a PNG."""
    empty_panels: list[str] = []
    real_no_data = dashboard._no_data

    def no_data(axes: Axes) -> None:
        empty_panels.append(axes.get_title())
        real_no_data(axes)

    monkeypatch.setattr(dashboard, "_no_data", no_data)
    empty = render_dashboard({}, tmp_path / "empty.png", "empty")
    assert png_size(empty) == (1200, 700)
    assert len(empty_panels) == 6
    empty_panels.clear()
    nan = float("nan")
    history: dict[str, tuple[npt.ArrayLike, npt.ArrayLike]] = {
        "loss": (np.arange(5.0), np.array([1.0, nan, np.inf, 0.5, -np.inf])),
        "grad_norm": (np.arange(3.0), np.full(3, nan)),
        "lr": ([0, 1, 2, 3], [1e-3, 1e-3]),  # lengths differ: the shorter wins
        "steps_per_second": (np.array([nan, 1.0]), np.array([2.0, 3.0])),
    }
    messy = render_dashboard(history, tmp_path / "messy.png", "messy")
    assert png_size(messy) == (1200, 700)
    assert empty_panels == ["gradient norm", "memory (GiB)", "feature diversity (effective rank)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "messy.png"]


def test_failed_write_leaves_no_temp_file(tmp_path: Path) -> None:
    """When the final rename fails, the error surfaces and the temp file is removed."""
    (tmp_path / "taken").mkdir()  # os.replace cannot put a file over a directory
    with pytest.raises(OSError):
        render_dashboard({}, tmp_path / "taken", "t")
    with pytest.raises(FileNotFoundError):
        render_dashboard({}, tmp_path / "missing" / "dash.png", "t")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert list((tmp_path / "taken").iterdir()) == []


def test_renders_on_a_worker_thread(tmp_path: Path) -> None:
    """The agent renders off the main thread; that must work (no pyplot, no GUI)."""
    errors: list[BaseException] = []

    def work() -> None:
        try:
            render_dashboard(small_history(), tmp_path / "thread.png", "thread")
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join(timeout=60)
    assert not errors and png_size(tmp_path / "thread.png") == (1200, 700)


def test_matplotlib_imported_lazily_and_never_pyplot(tmp_path: Path) -> None:
    """Importing the module loads no matplotlib; rendering loads no pyplot."""
    code = (
        "import sys; from pathlib import Path; import agent.analysis.dashboard as d\n"
        "assert 'matplotlib' not in sys.modules\n"
        f"d.render_dashboard({{}}, Path({str(tmp_path / 'x.png')!r}), 't')\n"
        "assert 'matplotlib' in sys.modules and 'matplotlib.pyplot' not in sys.modules\n"
    )
    root = REPO
    subprocess.run([sys.executable, "-P", "-c", code], cwd=root, check=True, timeout=120)


def test_image_jobs_free_their_figures_at_once(tmp_path: Path) -> None:
    """A Figure is a web of cycles and a worker process runs a full collection rarely:
    the dashboard and map jobs free theirs themselves, or its RSS climbs all run long."""
    import gc

    from matplotlib.figure import Figure

    from agent.analysis.maps import FeatureMap
    from agent.analysis.tasks import dashboard_job, map_job
    from agent.store.layout import TENSORS

    rows = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    (tmp_path / TENSORS).write_bytes(rows.tobytes())
    line = {"name": "h", "dtype": "float32", "shape": [64, 8], "offset": 0, "nbytes": rows.nbytes}
    gc.collect()
    gc.disable()  # as if Python's own schedule had no full collection due
    try:
        dashboard_job(small_history(), tmp_path / "dashboard.png", "run abc")
        map_job(FeatureMap(max_points=64), line, tmp_path, 5, "pca", tmp_path / "map.png", "h")
        left = [o for o in gc.get_objects() if type(o) is Figure]
    finally:
        gc.enable()
    assert left == []
    assert png_size(tmp_path / "dashboard.png") == (1200, 700)
    assert (tmp_path / "map.png").stat().st_size > 0
