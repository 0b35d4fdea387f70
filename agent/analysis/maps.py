"""t-SNE and PCA maps of feature batches, rendered to small PNGs.

One :class:`FeatureMap` per feature stream keeps its maps comparable from one
step to the next, so a reader flicking through them sees the representation
change, not the layout algorithm's arbitrary choices. openTSNE and matplotlib
are imported where they are used: the agent must start fast.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

# openTSNE reports each fit's method choice at INFO: noise in the agent's log.
logging.getLogger("openTSNE").setLevel(logging.WARNING)

FloatArray = npt.NDArray[np.float64]
IndexArray = npt.NDArray[np.intp]
MapMethod = Literal["tsne", "pca"]

DEFAULT_MAX_POINTS = 1000
MIN_TSNE_ROWS = 4
INIT_STD = 1e-4  # openTSNE's recommended spread for a given initialisation
MAP_SIZE_PX = 480
_DPI = 100


def _as_features(features: npt.ArrayLike) -> FloatArray:
    matrix = np.asarray(features)
    if matrix.ndim != 2:
        raise ValueError(f"features must be a 2-d (rows, dim) matrix, got shape {matrix.shape}")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise ValueError(f"features must hold real numbers, got dtype {matrix.dtype}")
    if matrix.shape[1] < 2:
        raise ValueError(f"features has shape {matrix.shape}: a 2-d map needs dim >= 2")
    return matrix.astype(np.float64, copy=False)


def _principal_axes(centred: FloatArray) -> FloatArray:
    """The top two principal axes, shape (2, dim), with whatever signs the SVD returns."""
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes: FloatArray = vt[:2]
    if axes.shape[0] < 2:  # a single row: no second direction
        axes = np.vstack([axes, np.zeros((2 - axes.shape[0], centred.shape[1]))])
    return axes


def _align_signs(axes: FloatArray, reference: FloatArray | None) -> FloatArray:
    """Flip each axis to point the way the reference axis does (the SVD's sign is arbitrary).

    Without a reference (first step, or the width changed), each axis is flipped
    so that its largest loading is positive, which is deterministic.
    """
    if reference is not None and reference.shape == axes.shape:
        signs = np.sign(np.einsum("ij,ij->i", axes, reference))
    else:
        largest = np.abs(axes).argmax(axis=1)
        signs = np.sign(axes[np.arange(axes.shape[0]), largest])
    signs[signs == 0] = 1.0
    aligned: FloatArray = axes * signs[:, None]
    return aligned


class FeatureMap:
    """2-d maps of one feature stream, kept comparable across steps.

    For t-SNE, the previous step's embedding initialises the next one when the
    new batch has the same number of rows; otherwise PCA does, with its axes'
    signs aligned to the previous step's PCA basis so the map does not flip.
    The previous embedding is only a meaningful starting point when row i is
    the same sample at every step: ship a FIXED probe batch (e.g. the same
    validation batch every time) to get truly comparable maps. With fresh
    random batches the maps still do not flip, but points do not correspond.

    At most ``max_points`` rows are mapped: a subsample drawn by a Generator
    seeded with ``random_state``, so the same rows are chosen at every step
    for a batch of the same size. ``n_jobs`` is openTSNE's thread count; the
    default 1 keeps the agent within its CPU budget. Holds per-stream state
    and no lock: one instance per stream, used by one worker at a time.
    """

    def __init__(
        self,
        max_points: int = DEFAULT_MAX_POINTS,
        n_jobs: int = 1,
        perplexity: float = 30.0,
        random_state: int = 0,
    ) -> None:
        if max_points < MIN_TSNE_ROWS:
            raise ValueError(f"max_points must be at least {MIN_TSNE_ROWS}, got {max_points}")
        if n_jobs < 1:
            raise ValueError(f"n_jobs must be at least 1, got {n_jobs}")
        if perplexity <= 0:
            raise ValueError(f"perplexity must be positive, got {perplexity}")
        self.max_points = max_points
        self.n_jobs = n_jobs
        self.perplexity = perplexity
        self.random_state = random_state
        self.step: int | None = None
        self.points: FloatArray | None = None
        """The latest map, (n, 2)."""
        self.indices: IndexArray | None = None
        """Rows of the latest ``update``'s input that ``points`` show, in order (for labels)."""
        self._pca_axes: FloatArray | None = None
        self._tsne_embedding: FloatArray | None = None

    def subsample(self, rows: int) -> IndexArray:
        """Sorted indices of at most ``max_points`` rows, the same ones for the same row count."""
        if rows <= self.max_points:
            return np.arange(rows, dtype=np.intp)
        generator = np.random.default_rng(self.random_state)
        chosen = generator.choice(rows, size=self.max_points, replace=False)
        return np.sort(chosen).astype(np.intp)

    def pca(self, features: npt.ArrayLike) -> FloatArray:
        """Projection of the mean-centred rows on their top two principal axes, (n, 2).

        The cheap map (one SVD). The axes' signs follow the previous call's, so
        the same data gives the same picture at every step. Maps every row given.
        """
        matrix = _as_features(features)
        if matrix.shape[0] < 2:
            raise ValueError(f"features has shape {matrix.shape}: a PCA map needs 2 rows or more")
        if not np.isfinite(matrix).all():
            raise ValueError("features contains NaN or Inf")
        centred = matrix - matrix.mean(axis=0)
        axes = _align_signs(_principal_axes(centred), self._pca_axes)
        self._pca_axes = axes
        points: FloatArray = centred @ axes.T
        return points

    def update(self, features: npt.ArrayLike, step: int, method: MapMethod = "tsne") -> FloatArray:
        """Map this step's batch; returns the (n, 2) points and keeps them for the next step.

        Rows with NaN/Inf are left out, then at most ``max_points`` are kept
        (``self.indices`` says which). Cost, measured on this project's 2-core
        development machine with n_jobs=1: t-SNE of 1,000 x 128 float32 rows
        takes 5.6-7.5 s (the spread is other load on the machine), plus ~1.5 s
        to import openTSNE on the first call; PCA of the same takes ~20 ms.
        openTSNE lets other Python threads run meanwhile (measured), but this
        is seconds of CPU: run it on a worker thread, never on the receive
        path, and not at every step.
        """
        if method not in ("tsne", "pca"):
            raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
        matrix = _as_features(features)
        finite = np.flatnonzero(np.isfinite(matrix).all(axis=1))
        indices = finite[self.subsample(finite.size)]
        minimum = MIN_TSNE_ROWS if method == "tsne" else 2
        if indices.size < minimum:
            raise ValueError(
                f"features has {matrix.shape[0]} rows, {finite.size} finite: "
                f"a {method} map needs at least {minimum}"
            )
        rows = matrix[indices]
        points = self._tsne(rows) if method == "tsne" else self.pca(rows)
        self.step = step
        self.indices = indices
        self.points = points
        return points

    def _tsne(self, rows: FloatArray) -> FloatArray:
        from openTSNE import TSNE

        previous = self._tsne_embedding
        if previous is not None and previous.shape[0] == rows.shape[0]:
            initialization = self._scaled_start(previous, jitter=False)
        else:
            initialization = self._scaled_start(self.pca(rows), jitter=True)
        perplexity = min(self.perplexity, (rows.shape[0] - 1) / 3)
        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            n_jobs=self.n_jobs,
            random_state=self.random_state,
            verbose=False,
        )
        embedding = tsne.fit(np.ascontiguousarray(rows), initialization=initialization)
        # A plain copy: the TSNEEmbedding keeps the affinity matrix and optimiser alive.
        points: FloatArray = np.array(embedding, dtype=np.float64)
        if not np.isfinite(points).all():
            raise ValueError("t-SNE produced non-finite points for this batch")
        self._tsne_embedding = points
        return points

    def _scaled_start(self, start: FloatArray, jitter: bool) -> FloatArray:
        """The starting layout scaled to std 1e-4 (first axis), as openTSNE expects.

        ``jitter`` adds seeded noise of 1% of that spread to a PCA start, which
        separates rows that coincide exactly (as openTSNE's own PCA start does);
        an all-identical batch starts from seeded noise instead.
        """
        generator = np.random.default_rng(self.random_state)
        spread = float(np.std(start[:, 0]))
        if not np.isfinite(spread) or spread <= 0.0:
            return generator.normal(0.0, INIT_STD, size=start.shape)
        scaled: FloatArray = start * (INIT_STD / spread)
        if jitter:
            scaled += generator.normal(0.0, INIT_STD * 0.01, size=start.shape)
        return scaled


def render_map(
    points: npt.ArrayLike,
    path: Path,
    title: str,
    labels: npt.ArrayLike | None = None,
) -> Path:
    """Draw a 2-d map as a ~480x480 px PNG at ``path``, written atomically; returns ``path``.

    Uses a private Figure on the Agg canvas, never pyplot's global state, so it
    is safe on a worker thread. The PNG appears complete or not at all (a tmp
    file in the same folder, then os.replace), so a sink never reads half a file.
    Integer labels get discrete colours, float labels a colour scale.
    """
    coordinates = np.asarray(points, dtype=np.float64)
    if coordinates.ndim != 2 or coordinates.shape[1] != 2 or coordinates.shape[0] == 0:
        raise ValueError(f"points must be a non-empty (n, 2) array, got shape {coordinates.shape}")
    if not np.isfinite(coordinates).all():
        raise ValueError("points contains NaN or Inf")
    colours = None if labels is None else np.asarray(labels)
    if colours is not None and colours.shape != (coordinates.shape[0],):
        raise ValueError(
            f"labels must have shape ({coordinates.shape[0]},) to match points, got {colours.shape}"
        )

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size_in = MAP_SIZE_PX / _DPI
    figure = Figure(figsize=(size_in, size_in), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    marker_size = 12.0 if coordinates.shape[0] <= 300 else 5.0
    if colours is None:
        axes.scatter(coordinates[:, 0], coordinates[:, 1], s=marker_size, alpha=0.7, linewidths=0)
    else:
        discrete = np.issubdtype(colours.dtype, np.integer) or colours.dtype == np.bool_
        axes.scatter(
            coordinates[:, 0],
            coordinates[:, 1],
            c=colours,
            cmap="tab10" if discrete else "viridis",
            s=marker_size,
            alpha=0.7,
            linewidths=0,
        )
    axes.set_title(title, fontsize=9)
    axes.set_xticks([])
    axes.set_yticks([])

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as png:
            figure.savefig(png, format="png", dpi=_DPI)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    return path
