"""t-SNE / PCA feature maps: comparable across steps, capped, rendered to a valid PNG atomically."""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from agent.analysis import maps
from agent.analysis.maps import FeatureMap, render_map
from tests.helpers import REPO

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def two_clusters(per_cluster: int = 60, dim: int = 10, seed: int = 0) -> npt.NDArray[np.float64]:
    """Two unit Gaussians whose centres are 10 apart along the first axis."""
    rng = np.random.default_rng(seed)
    first = rng.standard_normal((per_cluster, dim))
    second = rng.standard_normal((per_cluster, dim))
    second[:, 0] += 10.0
    return np.vstack([first, second])


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_import_is_light() -> None:
    """Importing agent.analysis.maps imports neither openTSNE nor matplotlib (fast start)."""
    code = (
        "import sys, agent.analysis.maps; "
        "assert 'openTSNE' not in sys.modules, 'openTSNE'; "
        "assert 'matplotlib' not in sys.modules, 'matplotlib'"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_pca_finds_the_dominant_direction() -> None:
    """The first PCA coordinate follows the one direction that carries the variance."""
    rng = np.random.default_rng(1)
    direction = rng.standard_normal(16)
    direction /= np.linalg.norm(direction)
    signal = rng.normal(0.0, 10.0, size=300)
    features = np.outer(signal, direction) + 0.1 * rng.standard_normal((300, 16)) + 5.0
    points = FeatureMap().pca(features.astype(np.float32))
    assert points.shape == (300, 2)
    assert abs(np.corrcoef(points[:, 0], signal)[0, 1]) > 0.999
    assert points[:, 0].std() > 50 * points[:, 1].std()
    np.testing.assert_allclose(points.mean(axis=0), 0.0, atol=1e-6)  # centred


def test_pca_keeps_its_orientation_when_the_svd_flips_signs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """When the SVD returns the opposite signs at the next step, the map does not flip."""
    features = two_clusters()
    feature_map = FeatureMap()
    first = feature_map.pca(features)

    real_axes = maps._principal_axes
    monkeypatch.setattr(maps, "_principal_axes", lambda centred: -real_axes(centred))
    second = feature_map.pca(features)
    np.testing.assert_allclose(second, first, atol=1e-9)

    # Without a previous basis, the convention (largest loading positive) is deterministic too.
    np.testing.assert_allclose(FeatureMap().pca(features), first, atol=1e-9)


def test_pca_signs_follow_the_previous_step_for_drifting_data() -> None:
    """Over many slightly different batches, the projection of a fixed reference never flips."""
    rng = np.random.default_rng(2)
    base = two_clusters(seed=3)
    feature_map = FeatureMap()
    reference = feature_map.pca(base)
    for step in range(20):
        drifted = base + 0.05 * rng.standard_normal(base.shape)
        points = feature_map.update(drifted, step, "pca")
        for axis in range(2):
            assert np.corrcoef(points[:, axis], reference[:, axis])[0, 1] > 0.9


def test_tsne_separates_two_clusters() -> None:
    """t-SNE keeps two well-separated Gaussian clusters apart: a linear rule classifies them."""
    features = two_clusters()
    truth = np.repeat([0, 1], 60)
    points = FeatureMap().update(features, step=0, method="tsne")
    assert points.shape == (120, 2)
    centroids = np.array([points[truth == label].mean(axis=0) for label in (0, 1)])
    spread = max(points[truth == label].std(axis=0).max() for label in (0, 1))
    assert np.linalg.norm(centroids[1] - centroids[0]) > 3 * spread
    # Nearest-centroid rule = the linear boundary halfway between the centroids.
    axis = centroids[1] - centroids[0]
    predicted = (points - centroids.mean(axis=0)) @ axis > 0
    assert np.array_equal(predicted, truth == 1)


def test_tsne_starts_from_the_previous_embedding_when_rows_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Same row count: the previous map is the (rescaled) start, and the new map stays close."""
    from openTSNE import TSNE

    starts: list[npt.NDArray[np.float64]] = []
    real_fit = TSNE.fit

    def recording_fit(
        self: Any, X: Any = None, affinities: Any = None, initialization: Any = None
    ) -> Any:
        starts.append(np.array(initialization))
        return real_fit(self, X, affinities, initialization)

    monkeypatch.setattr(TSNE, "fit", recording_fit)
    features = two_clusters(per_cluster=40, seed=4)
    feature_map = FeatureMap()
    first = feature_map.update(features, step=0, method="tsne")
    second = feature_map.update(features, step=1, method="tsne")

    assert len(starts) == 2
    np.testing.assert_allclose(starts[1], first * (1e-4 / first[:, 0].std()), rtol=1e-9)
    assert np.linalg.norm(second - first) < 0.5 * np.linalg.norm(first - first.mean(axis=0))
    assert feature_map.step == 1


def test_tsne_starts_from_aligned_pca_when_rows_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    """A different row count starts t-SNE from PCA whose signs follow the previous basis."""
    from openTSNE import TSNE

    starts: list[npt.NDArray[np.float64]] = []
    real_fit = TSNE.fit

    def recording_fit(
        self: Any, X: Any = None, affinities: Any = None, initialization: Any = None
    ) -> Any:
        starts.append(np.array(initialization))
        return real_fit(self, X, affinities, initialization)

    monkeypatch.setattr(TSNE, "fit", recording_fit)
    features = two_clusters(per_cluster=40, seed=5)
    feature_map = FeatureMap()
    feature_map.update(features, step=0, method="tsne")
    real_axes = maps._principal_axes
    monkeypatch.setattr(maps, "_principal_axes", lambda centred: -real_axes(centred))
    feature_map.update(features[:70], step=1, method="tsne")

    expected = FeatureMap().pca(features[:70])  # no previous basis: the deterministic convention
    for axis in range(2):
        assert np.corrcoef(starts[1][:, axis], expected[:, axis])[0, 1] > 0.999


def test_points_are_capped_by_a_deterministic_subsample() -> None:
    """At most max_points rows are mapped, the same seeded rows each time, reported in indices."""
    features = np.random.default_rng(6).standard_normal((1500, 8))
    feature_map = FeatureMap(max_points=50)
    points = feature_map.update(features, step=0, method="pca")
    assert points.shape == (50, 2)
    indices = feature_map.indices
    assert indices is not None
    assert np.array_equal(indices, np.unique(indices))
    np.testing.assert_allclose(points, FeatureMap().pca(features[indices]), atol=1e-9)

    again = FeatureMap(max_points=50)
    again.update(features, step=1, method="pca")
    assert again.indices is not None
    assert np.array_equal(again.indices, indices)
    assert not np.array_equal(FeatureMap(max_points=50, random_state=1).subsample(1500), indices)

    assert FeatureMap(max_points=30).update(features, step=0, method="tsne").shape == (30, 2)


def test_nonfinite_rows_are_left_out_of_the_map() -> None:
    """Rows with NaN/Inf are skipped, and indices name the rows that were mapped."""
    features = two_clusters(per_cluster=10)
    features[3, 1] = np.nan
    features[12] = np.inf
    feature_map = FeatureMap()
    points = feature_map.update(features, step=0, method="pca")
    assert points.shape == (18, 2)
    assert feature_map.indices is not None
    assert 3 not in feature_map.indices
    assert 12 not in feature_map.indices


@pytest.mark.parametrize(
    ("features", "method", "message"),
    [
        (np.zeros(10), "pca", "2-d"),
        (np.zeros((10, 1)), "pca", "dim >= 2"),
        (np.zeros((1, 5)), "pca", "at least 2"),
        (np.zeros((3, 5)), "tsne", "at least 4"),
        (np.full((6, 5), np.nan), "pca", "0 finite"),
        (np.zeros((10, 5)), "umap", "method must be"),
        (np.array([["a", "b"], ["c", "d"]]), "pca", "real numbers"),
    ],
)
def test_bad_features_raise_value_error(
    features: npt.NDArray[np.generic], method: Any, message: str
) -> None:
    """Wrong shape, too few finite rows, or an unknown method raise a clear ValueError."""
    with pytest.raises(ValueError, match=message):
        FeatureMap().update(features, step=0, method=method)


def test_bad_constructor_arguments_raise_value_error() -> None:
    """Nonsense caps, thread counts and perplexities are refused up front."""
    with pytest.raises(ValueError, match="max_points"):
        FeatureMap(max_points=1)
    with pytest.raises(ValueError, match="n_jobs"):
        FeatureMap(n_jobs=0)
    with pytest.raises(ValueError, match="perplexity"):
        FeatureMap(perplexity=0)


def test_render_map_writes_a_small_valid_png(tmp_path: Path) -> None:
    """render_map writes a 480x480 PNG at path, with labels, and leaves no tmp file behind."""
    points = FeatureMap().pca(two_clusters())
    path = tmp_path / "maps" / "student.png"
    returned = render_map(points, path, "student, step 100", labels=np.repeat([0, 1], 60))
    assert returned == path
    assert png_size(path) == (480, 480)
    assert [p.name for p in path.parent.iterdir()] == ["student.png"]

    render_map(points, path, "student, step 200")  # overwrites in place
    assert png_size(path) == (480, 480)
    assert [p.name for p in path.parent.iterdir()] == ["student.png"]


def test_render_map_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """If drawing fails midway, neither the PNG nor a tmp file is left behind."""
    from matplotlib.figure import Figure

    def broken_savefig(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        render_map(np.zeros((3, 2)), tmp_path / "map.png", "broken")
    assert list(tmp_path.iterdir()) == []


def test_render_map_runs_on_a_worker_thread(tmp_path: Path) -> None:
    """render_map works off the main thread (no pyplot state)."""
    errors: list[BaseException] = []

    def draw() -> None:
        try:
            render_map(np.random.default_rng(7).standard_normal((50, 2)), tmp_path / "t.png", "t")
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=draw)
    worker.start()
    worker.join(timeout=60)
    assert errors == []
    assert png_size(tmp_path / "t.png") == (480, 480)


@pytest.mark.parametrize(
    ("points", "labels", "message"),
    [
        (np.zeros((5, 3)), None, r"\(n, 2\)"),
        (np.zeros((0, 2)), None, r"\(n, 2\)"),
        (np.array([[0.0, np.nan]]), None, "NaN"),
        (np.zeros((5, 2)), np.zeros(4), r"labels must have shape \(5,\)"),
    ],
)
def test_render_map_bad_input_raises_value_error(
    tmp_path: Path,
    points: npt.NDArray[np.float64],
    labels: npt.NDArray[np.float64] | None,
    message: str,
) -> None:
    """Points that are not a finite (n, 2) array, or mismatched labels, raise ValueError."""
    with pytest.raises(ValueError, match=message):
        render_map(points, tmp_path / "bad.png", "bad", labels=labels)
    assert list(tmp_path.iterdir()) == []
