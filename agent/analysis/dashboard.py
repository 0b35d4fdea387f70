"""The training dashboard: one PNG of a run's history, drawn on an agent worker thread.

Six panels in a 2x3 grid, 1200x700 px:

- **loss**: ``loss`` (train) and ``val/loss``, with a log y axis when every value is positive
  and they span more than a decade (the same rule for the gradient norm);
- **learning rate**: ``lr``;
- **gradient norm**: ``grad_norm`` (before clipping), log y as for the loss;
- **throughput**: tokens/s, else samples/s, else steps/s. The per-step values are drawn
  faint, and the window means (``window/...`` from :mod:`agent.analysis.summaries`) bold on top;
- **memory**: ``cuda_memory_allocated_bytes``, ``cuda_memory_reserved_bytes`` and
  ``system/process/*/rss_bytes``, in GiB;
- **feature diversity**: ``features/<stream>/effective_rank``, one line per stream.

A panel without data says "no data", so that a missing signal shows instead of the panel
disappearing. NaN and infinite points are left out of the plots.

matplotlib is used through its object API (``Figure`` + ``FigureCanvasAgg``), never
pyplot: pyplot keeps global state and is not safe off the main thread. It is imported
inside :func:`render_dashboard`: the import takes about 0.8 s here, which the agent's
start must not pay. The PNG is written under a temporary name in the same directory and moved into
place with ``os.replace``, so a reader never sees half a file.

Render time on the development machine (2 shared CPU cores, Python 3.11, matplotlib 3.11),
six panels with 11 series of up to 2,000 points: median 0.87 s wall, 0.84 s CPU, over 7 warm
calls; an empty history takes about 0.17 s. The first call in a process is about 1.5 s
slower (the matplotlib import, and the first text layout). So callers should render at most
every few seconds, never once per step.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

SIZE_INCHES = (12.0, 7.0)
DPI = 100  # 1200x700 px
GIB = float(1 << 30)
MARGINS = {"left": 0.05, "right": 0.99, "bottom": 0.07, "top": 0.91, "wspace": 0.2, "hspace": 0.32}
MAX_LINES = 10  # per panel; more streams than this are listed as left out in the title

History = Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]
Line = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], str]

THROUGHPUT = (
    ("tokens_per_second", "tokens/s"),
    ("samples_per_second", "samples/s"),
    ("steps_per_second", "steps/s"),
)
MEMORY = (
    ("cuda_memory_allocated_bytes", "CUDA allocated"),
    ("cuda_memory_reserved_bytes", "CUDA reserved"),
)


def render_dashboard(history: History, path: Path, title: str) -> Path:
    """Draw ``history`` (name -> (steps, values)) as a PNG at ``path``; return ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(figure)  # attaches itself: the Agg renderer, no pyplot, no GUI
    # Fixed margins: the size never changes, and constrained layout would double the time.
    axes = figure.subplots(2, 3, gridspec_kw=MARGINS)
    loss, lr, grad, speed, memory, features = axes.flat

    _panel(loss, "loss", _lines(history, (("loss", "train"), ("val/loss", "val"))), log=True)
    _panel(lr, "learning rate", _lines(history, (("lr", "lr"),)))
    _panel(grad, "gradient norm", _lines(history, (("grad_norm", "grad_norm"),)), log=True)
    _throughput(speed, history)
    rss = [
        (name, f"RSS {middle}")
        for name, middle in _matching(history, "system/process/", "/rss_bytes")
    ]
    _panel(memory, "memory (GiB)", _lines(history, [*MEMORY, *rss], scale=1.0 / GIB))
    _panel(
        features,
        "feature diversity (effective rank)",
        _lines(history, _matching(history, "features/", "/effective_rank")),
    )

    last = _last_step(history)
    figure.suptitle(title if last is None else f"{title}  (step {last:g})")
    return _write_atomically(figure, path)


def _matching(history: History, prefix: str, suffix: str) -> list[tuple[str, str]]:
    """(name, middle part) of the series named ``prefix<middle>suffix``, sorted."""
    return [
        (name, name[len(prefix) : len(name) - len(suffix)])
        for name in sorted(history)
        if name.startswith(prefix) and name.endswith(suffix) and len(name) > len(prefix + suffix)
    ]


def _finite(
    xs: npt.ArrayLike, ys: npt.ArrayLike, scale: float = 1.0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    x = np.asarray(xs, dtype=np.float64).ravel()
    y = np.asarray(ys, dtype=np.float64).ravel()
    n = min(x.size, y.size)
    x, y = x[:n], y[:n]
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep] * scale


def _lines(history: History, names: Sequence[tuple[str, str]], scale: float = 1.0) -> list[Line]:
    """The named series that hold at least one finite point, as (x, y, label)."""
    out: list[Line] = []
    for name, label in names:
        series = history.get(name)
        if series is None:
            continue
        x, y = _finite(series[0], series[1], scale)
        if x.size:
            out.append((x, y, label))
    return out


def _panel(axes: Axes, title: str, lines: list[Line], log: bool = False) -> None:
    axes.set_title(title, fontsize=10)
    if not lines:
        _no_data(axes)
        return
    shown = lines[:MAX_LINES]
    for x, y, label in shown:
        axes.plot(x, y, label=label, linewidth=1.2, marker="." if x.size == 1 else None)
    if log and _spans_decades(shown):
        axes.set_yscale("log")
    if len(lines) > MAX_LINES:
        axes.set_title(f"{title} ({MAX_LINES} of {len(lines)})", fontsize=10)
    if len(shown) > 1:
        axes.legend(fontsize=8, loc="best")
    _style(axes)


def _spans_decades(lines: list[Line]) -> bool:
    """Log y pays off only when every value is positive and they span more than a decade."""
    low = min(float(y.min()) for _, y, _ in lines)
    high = max(float(y.max()) for _, y, _ in lines)
    return low > 0 and high > 10 * low


def _throughput(axes: Axes, history: History) -> None:
    """Per-step values faint, window means bold, in the first unit the run logged."""
    for name, unit in THROUGHPUT:
        raw = _lines(history, ((name, "per step"),))
        window = _lines(history, ((f"window/{name}", "window mean"),))
        if not raw and not window:
            continue
        axes.set_title(f"throughput ({unit})", fontsize=10)
        for x, y, label in raw:
            axes.plot(x, y, label=label, linewidth=0.8, alpha=0.35)
        for x, y, label in window:
            axes.plot(x, y, label=label, linewidth=1.6, marker="." if x.size == 1 else None)
        if raw and window:
            axes.legend(fontsize=8, loc="best")
        _style(axes)
        return
    axes.set_title("throughput", fontsize=10)
    _no_data(axes)


def _style(axes: Axes) -> None:
    """Few x ticks, as 20k / 1.5M: long step numbers would run into each other."""
    from matplotlib.ticker import EngFormatter, MaxNLocator

    axes.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    axes.xaxis.set_major_formatter(EngFormatter(sep=""))
    axes.set_xlabel("step", fontsize=8)
    axes.tick_params(labelsize=8)
    axes.grid(True, alpha=0.3)


def _no_data(axes: Axes) -> None:
    axes.text(0.5, 0.5, "no data", ha="center", va="center", color="0.5", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])


def _last_step(history: History) -> float | None:
    last: float | None = None
    for xs, ys in history.values():
        x, _ = _finite(xs, ys)
        if x.size:
            top = float(x.max())
            last = top if last is None else max(last, top)
    return last


def _write_atomically(figure: Figure, path: Path) -> Path:
    """PNG to a temporary name beside ``path``, then ``os.replace``: never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as file:
            figure.savefig(file, format="png", dpi=DPI)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
